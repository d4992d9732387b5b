"""What a new training run's cold compile is predicted to cost and save, by run length.

    python benchmarks/compile_plan.py
    python benchmarks/compile_plan.py --preset rlcm-incompressibility --vram 8GB --epochs 1,10,100

For a preset fitted to a card size (the time model's H100 rates), the predicted seconds
of the run's UNet work eager, compiled whole after a cold compile, and compiled by blocks
after theirs (``speed/compile_payoff.py``), and what a training run with an empty
compile cache takes (``memory.fit.compile_where_it_pays``: the quickest of the three).
Predictions, not measurements: the cold compiles are the H100's (290 and 158 s).
"""

from __future__ import annotations

import argparse
import copy

from lowvram_ddpo.architectures import default_architecture
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.memory.fit import fit_to_vram
from lowvram_ddpo.memory.units import parse_size
from lowvram_ddpo.speed.compile_payoff import compiled_run, quickest_scope, run_saving
from lowvram_ddpo.speed.devices import dense_fp16_tflops
from lowvram_ddpo.speed.time_model import Gpu

SCOPE_WORDS = {"model": "the whole UNet compiled", "blocks": "compiled by blocks"}


def rows(preset: str, vram: str, epochs: list[int]) -> list[str]:
    config = load_preset(preset)
    arch = default_architecture(config.model.name)
    h100 = Gpu.listed("H100", dense_fp16_tflops("NVIDIA H100 80GB HBM3") or 0.0)
    fitted = fit_to_vram(config, arch, parse_size(vram)).config
    lines = []
    for count in epochs:
        run = copy.deepcopy(fitted)
        run.run.epochs = count
        eager, _ = run_saving(run, arch, h100)
        whole = compiled_run(run, "model", arch, h100)
        blocks = compiled_run(run, "blocks", arch, h100)
        scope = quickest_scope(run, arch, h100, scope_held=False)
        best = "eager" if eager <= min(whole, blocks) else SCOPE_WORDS[scope]
        lines.append(
            f"| {preset} | {vram} | {count} | {eager:.0f} | {whole:.0f} | {blocks:.0f} | {best} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="incompressibility")
    parser.add_argument("--vram", default="7GB")
    parser.add_argument("--epochs", default="1,2,3,5,10,100")
    args = parser.parse_args()
    print("| preset | --vram | epochs | eager s | whole UNet s | blocks s | a new run takes |")
    print("|---|---|---|---|---|---|---|")
    for line in rows(args.preset, args.vram, [int(e) for e in args.epochs.split(",")]):
        print(line, flush=True)


if __name__ == "__main__":
    main()
