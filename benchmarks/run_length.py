"""How long a whole run takes on cards of other speeds, by the time model (no GPU needed).

    python benchmarks/run_length.py                        # the default table
    python benchmarks/run_length.py --presets incompressibility --vram 8GB,12GB --tflops 71

For each preset, card size (``--vram``) and card speed (``--tflops``: a listed dense fp16
rate, as ``speed/devices.py`` lists them: the RTX 3090's 71, the 4090's 165, the H100's
989), the settings ``--vram`` would pick and the predicted epoch and run (the preset's
epochs). Predictions of ``speed/time_model.py``, calibrated on an H100 and an H200: on
other cards its share of the listed rate (17%) is assumed, not measured.
"""

from __future__ import annotations

import argparse

import lowvram_ddpo.memory.fit as fit
from lowvram_ddpo.architectures import default_architecture
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.units import format_size, parse_size
from lowvram_ddpo.reporting.progress import format_duration
from lowvram_ddpo.speed.time_model import Gpu

PRESETS = "incompressibility,rlcm-incompressibility"
VRAM = "8GB,12GB,24GB"
TFLOPS = "40,71,165"


def row(preset: str, vram: str, tflops: float) -> str:
    config = load_preset(preset)
    arch = default_architecture(config.model.name)
    measured = fit.this_gpu
    fit.this_gpu = lambda: Gpu.listed(f"{tflops:g} TFLOP/s listed", tflops)  # the card ranked
    try:
        chosen = fit.fit_to_vram(config, arch, parse_size(vram))
    except UserError as error:
        return f"| {preset} | {vram} | {tflops:g} | {error} | - | - | - |"
    finally:
        fit.this_gpu = measured
    c = chosen.config
    settings = (
        f"sampling {c.sample.batch_size}, micro-batch {c.train.batch_size}"
        + (", checkpointing" if c.memory.gradient_checkpointing else "")
        + (", offload" if c.memory.offload else "")
        + (f", {c.speed.compile}" if c.speed.compile != "off" else "")
    )
    run = chosen.epoch_seconds * c.run.epochs
    return (
        f"| {preset} | {vram} | {tflops:g} | {settings} | {format_size(chosen.report.peak_bytes)} "
        f"| {format_duration(chosen.epoch_seconds)} | {format_duration(run)} ({c.run.epochs}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=PRESETS)
    parser.add_argument("--vram", default=VRAM)
    parser.add_argument("--tflops", default=TFLOPS)
    args = parser.parse_args()
    print("| preset | --vram | listed TFLOP/s | picks | peak (est.) | epoch | run (epochs) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for vram in args.vram.split(","):
            for tflops in (float(t) for t in args.tflops.split(",")):
                print(row(preset, vram, tflops), flush=True)


if __name__ == "__main__":
    main()
