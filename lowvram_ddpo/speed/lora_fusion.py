"""``speed.fused_lora``: a LoRA layer's up-projection, scaling and sum in one matmul.

peft computes a LoRA linear layer as ``base(x) + lora_B(lora_A(x)) * scaling``: besides
the two small matmuls, a multiply and an add, each a kernel that reads and writes a tensor
the size of the layer's output (SD 1.5 has 128 such layers; on the H100 the LoRA added
24 ms to the 52 ms forward of 16 latents, measured 2026-11-25). ``torch.addmm(base,
lora_A(x), lora_B.weight.T, alpha=scaling)`` is the up-projection, the scaling and the
sum in one GEMM that adds ``base`` in its epilogue: two kernels and three passes over the
output fewer per layer, and one rounding of the sum instead of three (it accumulates in
fp32 inside the GEMM). So the numbers change by that rounding; sampling and training
share the path, so the importance ratio stays one (a test replays through it). Off by
default until its speed and its fp16 replay error are measured on a GPU
(``benchmarks/unet_profile.py --variants fused-lora``, ``benchmarks/replay_error.py
--fused-lora``).

Only plain LoRA on ``nn.Linear`` is fused (one active adapter, no dropout, no DoRA, no
LoRA bias, not merged); any other call falls back to peft's own forward, as do the base
model's calls with the adapters switched off (the KL guard).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


def fuse_lora_layers(unet: nn.Module) -> int:
    """Give every LoRA linear layer of ``unet`` the fused forward; returns how many."""
    layers = [m for m in unet.modules() if isinstance(m, LoraLinear)]
    layers = [m for m in layers if isinstance(m.base_layer, nn.Linear)]
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
    return len(layers)


def _fusable_adapter(layer: LoraLinear, args: tuple, kwargs: dict) -> str | None:
    """The layer's one plain adapter when this call can take the fused path, else None."""
    if layer.disable_adapters or layer.merged or args or kwargs:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None:
        return None  # dropout, or peft's lora_bias: peft's own forward
    return name


def fused_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``base(x) + scaling * lora_B(lora_A(x))`` with the last three steps in one addmm."""
    name = _fusable_adapter(self, args, kwargs)
    if name is None:
        return LoraLinear.forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    down = lora_A(self._cast_input_dtype(x, lora_A.weight.dtype))
    up = lora_B.weight.t()
    base = result.reshape(-1, result.shape[-1])
    if not torch.is_autocast_enabled(x.device.type):  # addmm wants one dtype (autocast casts)
        base = base.to(up.dtype)
    fused = torch.addmm(base, down.reshape(-1, down.shape[-1]), up, alpha=self.scaling[name])
    return fused.to(result.dtype).view(result.shape)
