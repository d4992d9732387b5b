"""GroupNorm and LayerNorm in half precision under autocast (``speed.half_norms``).

CUDA autocast runs ``group_norm`` and ``layer_norm`` in float32 (its op lists): each norm
of an fp16 UNet casts its input up, writes a float32 output, the SiLU after it reads and
writes float32, and the next convolution or linear casts it back down. Measured on an
H100 (2026-11-26, SD 1.5, 16 latents per sampling call): copying and casting took 22.8
of the call's 70.6 ms of kernels, more than the convolutions (14.3). diffusers' own fp16
inference runs these norms in half precision, whose CUDA kernels still accumulate the
mean and variance in float32: here each norm runs in autocast's dtype instead, with
autocast off around it, and nothing else changes.

The arithmetic differs from autocast's by one rounding (the norm's output is rounded to
fp16 before the SiLU instead of after it), the same in sampling and in training, so a
run's replay stays exact where it was. The memory estimate counts the half copies
(``torch.group_norm``/``torch.layer_norm``, which its autocast emulation leaves alone).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lowvram_ddpo.memory.counting import emulated_autocast_dtype

AUTOCAST_DEVICES = ("cuda", "cpu")
"""Device types asked whether autocast is on (asking about one autocast does not know
raises: meta always, MPS before torch 2.5); elsewhere the norms run as they are. A plain
tuple, not ``torch.amp.is_autocast_available``: dynamo traces a membership test."""


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs low-precision ops in on ``x``'s device; None when off. On
    the meta device, the memory estimate's stand-in for CUDA autocast."""
    kind = x.device.type
    if kind == "meta":
        return emulated_autocast_dtype()
    if kind not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


OptionalTensor = torch.Tensor | None
"""A norm's weight or bias (None without an affine part)."""


def _as(weight: OptionalTensor, dtype: torch.dtype) -> OptionalTensor:
    return None if weight is None else weight.to(dtype)


def _autocast_off(x: torch.Tensor) -> AbstractContextManager:
    """Autocast off on ``x``'s device (the meta device has none: the estimate's emulation
    casts only the ``F.*`` norms, which these forwards do not call)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if kind in AUTOCAST_DEVICES else nullcontext()


class _HalfNorm(nn.Module):
    """Under autocast, the norm in autocast's dtype with autocast off around it; else the
    norm's own forward, called directly (a plain call every dynamo version traces: torch
    2.11 split the graph at a bound method once)."""

    weight: OptionalTensor
    bias: OptionalTensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        weight, bias = _as(self.weight, dtype), _as(self.bias, dtype)
        with _autocast_off(x):
            return self.normalise(x.to(dtype), weight, bias)

    def normalise(
        self, x: torch.Tensor, weight: OptionalTensor, bias: OptionalTensor
    ) -> torch.Tensor:
        raise NotImplementedError


class HalfGroupNorm(_HalfNorm, nn.GroupNorm):
    """``nn.GroupNorm`` that, under autocast, runs in autocast's dtype."""

    def normalise(
        self, x: torch.Tensor, weight: OptionalTensor, bias: OptionalTensor
    ) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, weight, bias, self.eps)


class HalfLayerNorm(_HalfNorm, nn.LayerNorm):
    """``nn.LayerNorm`` that, under autocast, runs in autocast's dtype."""

    def normalise(
        self, x: torch.Tensor, weight: OptionalTensor, bias: OptionalTensor
    ) -> torch.Tensor:
        return torch.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


_HALF = {nn.GroupNorm: HalfGroupNorm, nn.LayerNorm: HalfLayerNorm}


def run_norms_in_half(model: nn.Module) -> int:
    """Give every plain ``nn.GroupNorm`` and ``nn.LayerNorm`` of ``model`` the half-precision
    forward, in place (the class is swapped: parameter names, checkpoints and deep copies
    are unchanged); returns how many. Subclasses with a forward of their own are left."""
    norms = [m for m in model.modules() if type(m) in _HALF]
    for norm in norms:
        norm.__class__ = _HALF[type(norm)]
    return len(norms)


def restore_norms(model: nn.Module) -> None:
    """The plain norms back (``run_norms_in_half`` undone)."""
    plain = {half: base for base, half in _HALF.items()}
    for m in model.modules():
        if type(m) in plain:
            m.__class__ = plain[type(m)]
