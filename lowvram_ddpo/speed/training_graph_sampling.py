"""Sampling through the training call's compiled graph: an exact replay by construction.

A compiled UNet has one graph for the sampling call (eval mode, no gradients) and another
for the training call (train mode, forward and backward). Inductor fuses the two
differently, so they round, and even sum, in other orders: on the CPU in bf16 the pocket
model's replay missed by 30-70 times DDPO's clip range with Inductor's own roundings,
and 0.0 with eager's (``compile.inductor_options``), while in fp32 the two graphs still
differ by ulps (a GroupNorm mean summed in two orders). Calling the training graph for
sampling too, with the outputs detached, computes both with the same kernels: replayed
exactly whatever the compiler fuses (measured on the CPU: 0.0 in bf16 with Inductor's
own roundings, ``benchmarks/replay_error.py --training-graph-sampling``), and one graph
fewer to compile.

The cost: each sampling call keeps the training forward's saved activations until its
output is detached (with gradient checkpointing only the checkpoints' inputs), and the
sampling batch must be the training micro-batch for the shapes to match. Not yet a
trainer setting: the memory estimate does not count those activations in the sampling
phase, and the GPU speed is not measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_map_only


@contextlib.contextmanager
def through_training_graph(unet: torch.nn.Module) -> Iterator[None]:
    """Inside the block, calls of the compiled ``unet`` run its training graph (train
    mode, gradients on) and hand back detached outputs; an uncompiled ``unet`` has one
    path already and runs as it is."""
    compiled = unet._compiled_call_impl  # what nn.Module.compile installs
    if compiled is None:
        yield
        return
    was_training = unet.training

    def call(*args: object, **kwargs: object) -> object:
        with torch.enable_grad():
            output = compiled(*args, **kwargs)
        return tree_map_only(torch.Tensor, torch.Tensor.detach, output)

    unet.train()
    unet._compiled_call_impl = call
    try:
        yield
    finally:
        unet._compiled_call_impl = compiled
        unet.train(was_training)
