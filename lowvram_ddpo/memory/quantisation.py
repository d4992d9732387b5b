"""What a quantised base saves, for estimates (nothing is quantised here): bitsandbytes'
int8/nf4 Linear weights, or our fp8 Linear and Conv2d weights (``fp8_weights``)."""

from __future__ import annotations

from torch import nn

from lowvram_ddpo.memory.fp8_weights import fp8_bytes_saved, fp8_layers

BITS_PER_WEIGHT = {"int8": 8 + 0.25, "nf4": 4 + 0.127}
"""Quantised Linear weights: int8 + one fp32 scale per 128-wide row chunk (approx.);
nf4 + double-quantised absmax per block of 64 (bitsandbytes' QLoRA defaults)."""


def quantisable_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> list[nn.Linear]:
    """The frozen Linear layers a quantiser replaces: not LoRA matrices, not ``skip``
    (transformers keeps ``lm_head`` in full precision)."""
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and "lora_" not in name
        and not m.weight.requires_grad
        and not any(part in name.split(".") for part in skip)
    ]


def quantised_savings(
    model: nn.Module, quantize: str, skip: tuple[str, ...] = ()
) -> tuple[int, int]:
    """(bytes saved on the resident weights, bytes of the largest weight dequantised at a
    time during a forward pass)."""
    if quantize == "none":
        return 0, 0
    if quantize == "fp8":  # a layer's 16-bit copy (scaled in place) exists for its call
        layers = [layer for _, layer in fp8_layers(model)]
        saved = sum(fp8_bytes_saved(layer) for layer in layers)
        return saved, max((layer.weight.nbytes for layer in layers), default=0)
    linears = quantisable_linears(model, skip)
    saved = sum(
        m.weight.nbytes - int(m.weight.numel() * BITS_PER_WEIGHT[quantize] / 8) for m in linears
    )
    return saved, max((m.weight.nbytes for m in linears), default=0)
