"""The frozen base's weights stored in 8 bits (``memory.quantize=fp8``), computed in 16.

Each frozen ``nn.Linear`` and ``nn.Conv2d`` of the denoiser keeps its weight as
``float8_e4m3fn`` with one scale per output channel (the channel's largest magnitude maps
to 448, fp8's largest value), and turns it back into its own dtype (fp16/bf16) for every
call: half the memory of the base (SDXL's UNet: 4.8 -> ~2.4 GiB), in plain PyTorch, so it
runs where bitsandbytes does not (a CPU, Windows without its CUDA build, an old card; not
Apple's MPS, which has no float8 storage) and inside CUDA graphs and ``torch.compile``. It
is what kohya's ``--fp8_base`` does, with a per-channel scale that keeps small channels out
of fp8's subnormal range.

The model computed is exactly the original with each weight replaced by its dequantised
value (rounded to the nearest fp8 step of its channel's scale, 3 significant bits: ~3.6%
rms relative error per weight, against nf4's 16 levels per block; then to the layer's
dtype by the scale's multiply), the same in sampling and in training: a run's replay
stays exact. The layers' backward keeps no dequantised weight: it dequantises again (a
forward's saved weights would hold a 16-bit copy of the whole base by the backward).

The input, output and embedding layers stay as they are (``KEPT_AS_LOADED``): they are
small, sit where errors propagate furthest, and diffusers reads a model's dtype from its
first parameter. The trainer converts after attaching the LoRA (peft builds its adapters
from the 16-bit layers, in their dtype), on the host, then moves the UNet to the card: the
16-bit base never needs to fit there. LoRA layers (trainable) are never touched.

Under ``torch.compile`` the dequantisation is an opaque op (``dequantise_fp8``, and
``dequantise_fp8_again`` in the backward, so that Inductor's partitioner cannot merge the
two and save the 16-bit weight): Inductor would otherwise write a Triton kernel reading
fp8, which Triton refuses on cards before Ada/Hopper (compute capability 8.9); eager
PyTorch converts fp8 on any CUDA card or CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowvram_ddpo.speed.half_norms import autocast_dtype

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448

KEPT_AS_LOADED = frozenset(
    {
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "time_proj",
        "add_embedding",
        "class_embedding",
        "pos_embed",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "time_guidance_embed",
        "norm_out",
        "proj_out",
    }
)
"""Top-level children of a UNet / SD 3 / FLUX.2 transformer left in their loaded dtype:
the first and last layers and the timestep, text and position embeddings (a nested
``proj_out``, an attention block's, is converted)."""


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-output-channel scale in ``weight``'s dtype) with
    ``dequantise(fp8, scale)`` the nearest representable weight. The scale is rounded to
    its dtype first and the weight divided by the rounded scale, so the stored pair means
    what it says; it is kept at least the dtype's smallest normal number (fp16's 6e-5), so
    a multiply by it loses nothing to subnormals."""
    dims = tuple(range(1, weight.dim()))
    largest = weight.detach().float().abs().amax(dim=dims, keepdim=True)
    scale = (largest / FP8_MAX).clamp(min=torch.finfo(weight.dtype).tiny).to(weight.dtype)
    scaled = weight.detach().float() / scale.float()
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


DEQUANTISE_SCHEMA = "(Tensor stored, Tensor scale) -> Tensor"
"""Given outright: torch 2.4 reads no schema from string annotations."""


def _dequantised(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # a tensor of our own, scaled in place: nothing to record
        return stored.to(scale.dtype, copy=True).mul_(scale)


def _like_dequantised(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(stored, dtype=scale.dtype)


# Two ops of one body: the forward's and the backward's. Inductor's partitioner merges
# identical calls of the joint graph and may not recompute a custom op, so one op in both
# would have it save every layer's 16-bit weight for the backward.
dequantise_fp8 = torch.library.custom_op(
    "lowvram_ddpo::dequantise_fp8", _dequantised, mutates_args=(), schema=DEQUANTISE_SCHEMA
)
dequantise_fp8_again = torch.library.custom_op(
    "lowvram_ddpo::dequantise_fp8_again", _dequantised, mutates_args=(), schema=DEQUANTISE_SCHEMA
)
dequantise_fp8.register_fake(_like_dequantised)
dequantise_fp8_again.register_fake(_like_dequantised)


def dequantise(stored: torch.Tensor, scale: torch.Tensor, again: bool = False) -> torch.Tensor:
    """The weight in the scale's dtype (the layer's own). Eagerly two plain kernels (a
    custom op's dispatch would add host time to every layer's call); traced, an opaque op,
    the backward's (``again``) another than the forward's."""
    if torch.compiler.is_compiling():
        return (dequantise_fp8_again if again else dequantise_fp8)(stored, scale)
    return _dequantised(stored, scale)


class _Fp8Function(torch.autograd.Function):
    """``F.linear`` (``layout`` None) or ``F.conv2d`` (``layout``: stride, padding,
    dilation, groups) with a weight dequantised for the call. The backward returns the
    input's gradient only (the weight and bias are frozen): it dequantises again rather
    than keep a 16-bit copy, and computes in the forward's dtype (autocast's where it was
    on, as autocast casts a Linear's or Conv2d's operands; else the weight's own), as
    autograd does for the original layer."""

    @staticmethod
    def forward(  # noqa: ANN205
        ctx: Any,
        x: torch.Tensor,
        stored: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        layout: tuple | None,
    ):
        ctx.save_for_backward(stored, scale)
        ctx.input_dtype, ctx.input_shape, ctx.layout = x.dtype, x.shape, layout
        ctx.compute_dtype = autocast_dtype(x) or scale.dtype
        weight = dequantise(stored, scale)
        if layout is None:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, *layout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # noqa: ANN205
        stored, scale = ctx.saved_tensors
        weight = dequantise(stored, scale, again=True).to(ctx.compute_dtype)
        grad = grad.to(weight.dtype)
        if ctx.layout is None:
            x_grad = grad.matmul(weight)
        else:
            x_grad = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, *ctx.layout)
        return x_grad.to(ctx.input_dtype), None, None, None, None


def _stored_in_fp8(layer: nn.Module) -> bool:
    """False for a layer built as this class without a conversion: peft builds a LoRA
    adapter of a Conv2d with its base layer's class (a LoRA loaded onto an fp8 base, as
    `sample` does); such a layer is a plain trainable one."""
    return "weight_scale" in layer._buffers


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in fp8 (``weight``) with a scale per
    output feature (``weight_scale``); ``compute_dtype`` is the weight's dtype as loaded
    (peft reads it as the layer's dtype)."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _stored_in_fp8(self):
            return super().forward(x)
        return _Fp8Function.apply(x, self.weight, self.weight_scale, self.bias, None)


class Fp8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored in fp8, as ``Fp8Linear``."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _stored_in_fp8(self):
            return super().forward(x)
        layout = (self.stride, self.padding, self.dilation, self.groups)
        return _Fp8Function.apply(x, self.weight, self.weight_scale, self.bias, layout)


FP8_CLASSES = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def _convertible(name: str, layer: nn.Module) -> bool:
    if type(layer) not in FP8_CLASSES or name.split(".")[0] in KEPT_AS_LOADED:
        return False
    if "lora_" in name or any(p.requires_grad for p in layer.parameters()):
        return False  # trained weights stay in full precision
    if not layer.weight.is_floating_point() or layer.weight.element_size() < 2:
        return False  # already 8-bit or integer
    if isinstance(layer, nn.Conv2d):  # the backward's conv2d_input takes numeric padding
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return True


def fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``store_weights_in_fp8`` converts, by name: frozen plain Linear and
    Conv2d layers outside ``KEPT_AS_LOADED``, not LoRA's (the memory estimate counts
    these too)."""
    return [(name, layer) for name, layer in model.named_modules() if _convertible(name, layer)]


def fp8_bytes_saved(layer: nn.Module) -> int:
    """What converting ``layer`` saves: its weight's bytes less one byte a weight and the
    scales."""
    weight = layer.weight
    return weight.nbytes - weight.numel() - weight.shape[0] * weight.element_size()


@torch.no_grad()
def store_weights_in_fp8(model: nn.Module) -> int:
    """Convert ``model``'s frozen layers in place, one at a time (the memory peak is the
    model plus one layer's float32 copy); returns how many."""
    layers = fp8_layers(model)
    for _, layer in layers:
        weight = layer.weight
        stored, scale = quantise(weight)
        layer.compute_dtype = weight.dtype
        layer.weight = nn.Parameter(stored, requires_grad=False)
        layer.register_buffer("weight_scale", scale)
        # the class changes, the module stays: hooks, peft's and the offloader's
        # references and diffusers' attributes all still point at it
        layer.__class__ = FP8_CLASSES[type(layer)]
    return len(layers)


def keep_out_of_ddp_sync(model: nn.Module) -> list[str]:
    """Leave the fp8 weights and their scales out of DistributedDataParallel's start-up
    broadcast (every process converted the same loaded weights the same way; NCCL's
    coalesced broadcast cannot concatenate fp8 tensors); returns their names."""
    names = [
        f"{name}.{tensor}"
        for name, layer in model.named_modules()
        if isinstance(layer, Fp8Linear | Fp8Conv2d) and _stored_in_fp8(layer)
        for tensor in ("weight", "weight_scale")
    ]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, names
    )
    return names
