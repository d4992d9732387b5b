"""How long the meta-device memory estimate takes, with and without the counter's
shape-only kernels (``lowvram_ddpo.memory.counting.SHAPE_ONLY_KERNELS``), and whether the
two give the same bytes for every phase of every shipped architecture.

    python benchmarks/estimate_speed.py            # ~4 min on 2 cores
    python benchmarks/estimate_speed.py --quick    # SD 1.5 and pocket only
    python benchmarks/estimate_speed.py --fit      # seconds of two `--vram` fits, as they are

Each row estimates its preset with gradient checkpointing off and on, at micro-batch 1
and 2 (four estimates, the models built once per arch as the auto-fit does).
"""

from __future__ import annotations

import argparse
import copy
import time

import lowvram_ddpo.memory.counting as counting
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.memory.estimate import _RECENT_RUNS, estimate_memory

ROWS = [
    ("sd15", "incompressibility"),
    ("sd15", "prompt-alignment"),
    ("sd15-lcm", "rlcm-incompressibility"),
    ("sdxl", "sdxl-aesthetic"),
    ("sd35m", "sd35m-grpo-incompressibility"),
    ("sd35m", "sd35m-nft-aesthetic"),
    ("flux2-klein", "flux2-klein-grpo-incompressibility"),
    ("pocket", "pocket-incompressibility"),
]


def estimates(arch: str, preset: str) -> list[list[tuple[str, int, int]]]:
    """Every phase's (name, peak allocated, peak reserved) of the row's four settings."""
    _RECENT_RUNS.clear()
    config, out = load_preset(preset), []
    per_step = config.train.batch_size * config.train.gradient_accumulation_steps
    for checkpointing in (False, True):
        for micro in (1, 2):
            trial = copy.deepcopy(config)
            trial.memory.gradient_checkpointing = checkpointing
            trial.train.batch_size = micro
            trial.train.gradient_accumulation_steps = per_step // micro
            report = estimate_memory(trial, arch)
            out.append([(p.name, p.peak_allocated, p.peak_reserved) for p in report.phases])
    return out


FITS = [("sd15", "incompressibility", 512, 6), ("sdxl", "incompressibility", 1024, 8)]
"""What `train --preset P --vram N GB` fits (arch, preset, resolution, GB)."""


def time_fits() -> None:
    """Seconds of each `--vram` fit of FITS in a fresh process's state (no estimate kept)."""
    from lowvram_ddpo.memory.fit import fit_to_vram
    from lowvram_ddpo.memory.units import GB

    estimates("pocket", "pocket-incompressibility")  # imports and first-call costs
    for arch, preset, resolution, gb in FITS:
        _RECENT_RUNS.clear()
        config = load_preset(preset)
        config.sample.resolution = resolution
        start = time.perf_counter()
        fit = fit_to_vram(config, arch, gb * GB)
        seconds = time.perf_counter() - start
        print(f"{arch} {preset} {resolution} px --vram {gb}GB: {seconds:.1f} s ({fit.changes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD 1.5 and pocket only")
    parser.add_argument("--fit", action="store_true", help="time two --vram fits instead")
    args = parser.parse_args()
    if args.fit:
        time_fits()
        return
    rows = [r for r in ROWS if r[0] in ("sd15", "pocket")] if args.quick else ROWS
    kernels = dict(counting.SHAPE_ONLY_KERNELS)
    estimates("pocket", "pocket-incompressibility")  # imports and first-call costs
    print(f"{'arch':<12} {'preset':<36} {'PyTorch s':>9} {'shortcuts s':>11} {'ratio':>6}  same")
    total = {True: 0.0, False: 0.0}
    for arch, preset in rows:
        result, seconds = {}, {}
        for shortcuts in (False, True):
            counting.SHAPE_ONLY_KERNELS = kernels if shortcuts else {}
            start = time.perf_counter()
            result[shortcuts] = estimates(arch, preset)
            seconds[shortcuts] = time.perf_counter() - start
            total[shortcuts] += seconds[shortcuts]
        print(
            f"{arch:<12} {preset:<36} {seconds[False]:>9.1f} {seconds[True]:>11.1f} "
            f"{seconds[False] / seconds[True]:>6.2f}  {result[False] == result[True]}"
        )
    ratio = total[False] / total[True]
    print(f"{'all':<49} {total[False]:>9.1f} {total[True]:>11.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
