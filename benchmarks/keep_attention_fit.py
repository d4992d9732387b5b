"""What `--vram` picks for a card size with memory.keep_attention on the table, and the
same fit with it flipped: the predicted epoch (the time model's H100 rates) and the
estimated peak of each.

    python benchmarks/keep_attention_fit.py
    python benchmarks/keep_attention_fit.py --preset sdxl-aesthetic --vram 8GB,12GB,16GB

Predictions and estimates, not measurements (no GPU needed; ~15 s per SD 1.5 size).
Prints a markdown table, then self-attention's part of what checkpointing recomputes
(counted on the meta device).
"""

from __future__ import annotations

import argparse
import copy

from lowvram_ddpo.architectures import default_architecture
from lowvram_ddpo.config import apply_overrides, load_preset
from lowvram_ddpo.memory.estimate import estimate_memory, meta_run
from lowvram_ddpo.memory.fit import fit_to_vram
from lowvram_ddpo.memory.units import GB, parse_size
from lowvram_ddpo.speed.devices import dense_fp16_tflops
from lowvram_ddpo.speed.flops import epoch_flops
from lowvram_ddpo.speed.time_model import Gpu, leaf_modules, predict_epoch


def row(preset: str, vram: str) -> str:
    config = load_preset(preset)
    apply_overrides(config, ["memory.optimizer=adamw"])  # as the GPU benchmarks run it
    arch = default_architecture(config.model.name)
    h100 = Gpu.listed("H100", dense_fp16_tflops("NVIDIA H100 80GB HBM3") or 0.0)
    modules = leaf_modules(meta_run(config, arch).parts.unet)
    fitted = fit_to_vram(config, arch, parse_size(vram)).config
    m = fitted.memory
    picked = (
        f"micro-batch {fitted.train.batch_size}, "
        + (
            f"{m.uncheckpointed_levels} level(s) out of checkpointing"
            if m.gradient_checkpointing
            else "no checkpointing"
        )
        + (", attention kept" if m.keep_attention else "")
    )

    def epoch_and_peak(trial: object) -> str:
        flops = epoch_flops(trial, arch, count_backward=False)
        seconds = predict_epoch(trial, flops, h100, modules).total
        return f"{seconds:.0f} s, {estimate_memory(trial, arch).peak_bytes / GB:.2f} GB"

    flipped = "-"
    if m.gradient_checkpointing:
        other = copy.deepcopy(fitted)
        other.memory.keep_attention = not m.keep_attention
        flipped = epoch_and_peak(other)
    return f"| {preset} | {vram} | {picked} | {epoch_and_peak(fitted)} | {flipped} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="incompressibility")
    parser.add_argument("--vram", default="7GB,8GB,12GB,16GB")
    args = parser.parse_args()
    print("| preset | --vram | fit | epoch, peak | the same with keep_attention flipped |")
    print("|---|---|---|---|---|")
    for vram in args.vram.split(","):
        print(row(args.preset, vram))
    print()
    print(share_line(args.preset))


def share_line(preset: str) -> str:
    """Self-attention's part of what checkpointing recomputes, by levels kept out."""
    config = load_preset(preset)
    arch = default_architecture(config.model.name)
    shares = epoch_flops(config, arch, count_backward=False).recomputation.self_attention
    parts = ", ".join(f"{k} level(s) out: {share:.1%}" for k, share in enumerate(shares))
    return f"self-attention, of what full checkpointing recomputes ({arch}): {parts}"


if __name__ == "__main__":
    main()
