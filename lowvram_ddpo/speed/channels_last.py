"""The denoiser's convolutions in channels-last (NHWC) layout (``speed.channels_last``).

A GPU's tensor-core convolution kernels take NHWC: given PyTorch's default NCHW tensors,
cuDNN turns each convolution's input into NHWC and its output back. Profiled on an H100
(2026-11-27, SD 1.5 fitted to 7 GB, Inductor): those layout changes took 0.61 of an
epoch's 9.61 s of kernels (6.3%; ``nchwToNhwcKernel`` once per convolution). Inductor
picks channels-last for a graph by itself only where its heuristic allows, and that
heuristic skips any training graph with a convolution of twice as many input channels
as output ones, as every SD up block has (the skip connection concatenated: 2560 ->
1280): SD's training call stays NCHW.

With the weights stored channels-last, each convolution's output is channels-last too
(cuDNN's choice follows either operand), the elementwise layers after it keep the
layout, and the attention blocks' flattening to tokens becomes a view. Eager on an H100
(2026-11-26, ``benchmarks/unet_profile.py``): the training call 8% faster, the sampling
call 10% slower (eager GroupNorm copies NHWC input; Inductor's fused norms do not).
The arithmetic is the same operations on the same values; the kernels cuDNN picks may
differ, the same in sampling and in training (the replay measures it).
"""

from __future__ import annotations

import torch
from torch import nn


def convolutions_in_channels_last(denoiser: nn.Module) -> int:
    """Store every frozen 4-d weight of ``denoiser`` (its convolutions') in channels-last
    layout, in place. Trained weights (LoRA's) keep theirs: safetensors checkpoints take
    contiguous tensors only, and a LoRA convolution's few weights cost cuDNN nothing to
    turn; a full fine-tune (every weight trained) is left as it is. Returns how many
    tensors it re-laid (0 for a transformer, which has no convolutions to speak of)."""
    relaid = 0
    for param in denoiser.parameters():
        if param.requires_grad or param.dim() != 4:
            continue
        if not param.is_contiguous(memory_format=torch.channels_last):
            param.data = param.data.contiguous(memory_format=torch.channels_last)
            relaid += 1
    return relaid
