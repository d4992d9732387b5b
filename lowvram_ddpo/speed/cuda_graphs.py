"""What the CUDA-graph modes of ``speed.compile`` need around the compiled UNet.

cudagraph trees (``reduce-overhead``, ``cudagraphs``) leave each replayed graph's outputs
in the graph's own memory pool, where a later replay overwrites them: the UNet's output,
and in the backward graph the LoRA gradients. Two uses of ours would read such memory
after it was overwritten:

- gradient accumulation: after ``zero_grad`` the first micro-step's gradient *is* the
  pool's tensor, so the next replay corrupts the sum (pytorch#96693: silently wrong
  gradients; pytorch#169545; fixed for Inductor only after torch 2.11, pytorch#184153).
  Each gradient is copied out of the pool as it is produced.
- outputs kept past the next call (the KL guard's base-model step, NFT's old velocity, an
  fp32 run's ``.float()`` that copies nothing): each call starts a new step
  (``cudagraph_mark_step_begin``, which the ``cudagraphs`` backend of torch 2.11 needs
  after calls without gradients, pytorch#174713) and hands back copies.

Both change no number (a CPU test checks the outputs and accumulated gradients against
eager); they cost a copy of the LoRA gradients per backward and of the UNet's output per
call, small beside the UNet. Found by a search of PyTorch's issues (2026-11-25), not yet
seen on a GPU here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map_only

GRAPH_MODES = ("reduce-overhead", "max-autotune", "cudagraphs")
"""``speed.compile`` modes whose calls replay CUDA graphs (cudagraph trees; Inductor's
``max-autotune`` turns on ``triton.cudagraphs`` as ``reduce-overhead`` does)."""


def replays_cuda_graphs(mode: str, backend: str) -> bool:
    """Whether calls of a UNet compiled with ``mode`` and ``backend`` replay CUDA graphs."""
    return mode in GRAPH_MODES or backend == "cudagraphs"


def keep_gradients_out_of_the_pool(unet: torch.nn.Module) -> None:
    """Copy each trainable parameter's gradient as the backward produces it."""
    for p in unet.parameters():
        if p.requires_grad:
            p.register_hook(torch.clone)  # the hook's result is what accumulates


def new_step_per_call(unet: torch.nn.Module) -> None:
    """Each call of the compiled ``unet`` starts a new cudagraph step and returns copies
    of its outputs (``unet.compile`` must have run)."""
    compiled: Callable = unet._compiled_call_impl  # what nn.Module.compile installs
    if compiled is None:
        raise ValueError("new_step_per_call needs a module compiled in place")

    def call(*args: object, **kwargs: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))

    unet._compiled_call_impl = call


def make_graph_safe(unet: torch.nn.Module) -> None:
    """Both guards, for a UNet compiled in a CUDA-graph mode."""
    keep_gradients_out_of_the_pool(unet)
    new_step_per_call(unet)
