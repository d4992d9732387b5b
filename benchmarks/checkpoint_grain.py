"""What checkpointing an attention layer whole costs against diffusers' own grain, timed
on this machine's CPU: SD 1.5's largest attention layer (64x64 latents at 512 px, 320
channels, 2 latents: one image with guidance), forward + backward, fp32, random weights.

    python benchmarks/checkpoint_grain.py [--repeats 3]

`memory/checkpointing.py` recomputes the layer's GroupNorm, proj_in and proj_out beside
its transformer block; diffusers recomputes the block alone. The modes run interleaved,
each repeat timing two steps after one untimed, so that a shared machine's drift falls on
all three alike. Run it alone: it measures wall-clock time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from lowvram_ddpo.memory.checkpointing import disable_checkpointing, enable_checkpointing

MODES = ("no checkpointing", "diffusers' grain (the block)", "the layer whole")


def sd15_top_attention_layer() -> Transformer2DModel:
    torch.manual_seed(0)
    return Transformer2DModel(
        num_attention_heads=8,
        attention_head_dim=40,
        in_channels=320,
        cross_attention_dim=768,
        norm_num_groups=32,
        num_layers=1,
    )


def use_mode(layer: Transformer2DModel, mode: str) -> None:
    disable_checkpointing(layer)
    if mode == MODES[1]:
        layer.enable_gradient_checkpointing()
    elif mode == MODES[2]:  # the layer is a diffusers model of its own: taken whole
        enable_checkpointing(layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layer = sd15_top_attention_layer()
    x = torch.randn(2, 320, 64, 64, requires_grad=True)
    text = torch.randn(2, 77, 768)

    def step() -> None:
        out = layer(x, encoder_hidden_states=text, return_dict=False)[0]
        out.square().mean().backward()

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            use_mode(layer, mode)
            step()
            started = time.perf_counter()
            step()
            step()
            times[mode].append((time.perf_counter() - started) / 2)
    plain = statistics.median(times[MODES[0]])
    print(f"CPU, {torch.get_num_threads()} threads, fp32, median of {args.repeats}:\n")
    print("| checkpointing | seconds per forward + backward | over none |")
    print("|---|---|---|")
    for mode, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {mode} | {median:.2f} | {median / plain - 1:+.0%} |")


if __name__ == "__main__":
    main()
