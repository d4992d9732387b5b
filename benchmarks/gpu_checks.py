"""The GPU checks the open issues name, in one script for a session that is lent a GPU.

    python benchmarks/gpu_checks.py --rows sd15,sd15-checkpointing,rlcm-sd15 > out.md

Each row runs one shortened epoch of the real trainer (`bench memory`'s measured path:
random weights built from the architecture's config, nothing downloaded) and, beside it,
the meta-device estimate of the same settings. It prints, per row, the seconds per image
of each phase, the epoch time they project for the preset's samples per epoch, the
measured peak (`torch.cuda.max_memory_reserved`) and the estimate, and the ratio that
calibrates `RESERVED_OVER_ALLOCATED` (measured reserved / estimated allocated).

- memory issue: calibration rows (`sd15*`, `sdxl*`), what each lever costs in time
  (`sd15` vs `-checkpointing`, `-no-offload`, `-nf4`), and `sd15-reference`: the
  reference implementation's micro-batch 4 with every model on the card and plain AdamW;
- RLCM issue: time per epoch and peak of each mode (`sd15` vs `rlcm-sd15`, `sdxl` vs
  `rlcm-sdxl`);
- flow-matching issue: SD 3.5 Medium (`sd35m-grpo`, `sd35m-nft`; without T5, whose
  tokenizer cannot be built offline) and FLUX.2-klein Base 4B (`flux2-klein` with its nf4
  base, which needs bitsandbytes, and `flux2-klein-bf16`) at 512 px.

A row takes from ~1 minute (SD 1.5) to several (SDXL at 1024 px): split the rows over
runs that fit the device's 10-minute limit. Without CUDA it runs the same code on the CPU
(seconds only): `--rows pocket` is the smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from lowvram_ddpo.memory.allocator import configure_allocator

configure_allocator()  # as the command line does: before torch is imported

from lowvram_ddpo.config import Config, apply_overrides, load_preset, validate  # noqa: E402
from lowvram_ddpo.memory.estimate import estimate_memory  # noqa: E402
from lowvram_ddpo.memory.measure import bench_config, measure_run  # noqa: E402
from lowvram_ddpo.memory.report import MemoryReport  # noqa: E402
from lowvram_ddpo.memory.units import GB  # noqa: E402


@dataclass
class Row:
    preset: str
    arch: str
    overrides: list[str]
    what: str


EAGER = "speed.compile='off'"
"""Every row runs eagerly: one epoch is timed, and a compile (Inductor in the SD 1.5 presets,
minutes) or the graphs' recording would be timed with it."""

ROWS = {
    "sd15": Row("incompressibility", "sd15", [EAGER], "paper preset as written, eager"),
    "sd15-checkpointing": Row(
        "incompressibility",
        "sd15",
        [EAGER, "memory.gradient_checkpointing=true"],
        "+ checkpointing",
    ),
    "sd15-no-offload": Row(
        "incompressibility", "sd15", [EAGER, "memory.offload=false"], "no offload"
    ),
    "sd15-nf4": Row("incompressibility", "sd15", [EAGER, "memory.quantize='nf4'"], "nf4 base"),
    "sd15-reference": Row(
        "incompressibility",
        "sd15",
        [
            EAGER,
            "train.batch_size=4",
            "train.gradient_accumulation_steps=16",
            "memory.offload=false",
            "memory.optimizer='adamw'",
        ],
        "the reference's micro-batch 4, all on the card, AdamW",
    ),
    "sd15-aesthetic": Row("aesthetic", "sd15", [EAGER], "CLIP scorer (random weights)"),
    "rlcm-sd15": Row("rlcm-incompressibility", "sd15-lcm", [EAGER], "RLCM, 8 steps"),
    "sdxl": Row("sdxl-aesthetic", "sdxl", [], "SDXL 1024 px preset"),
    "sdxl-nf4": Row("sdxl-aesthetic", "sdxl", ["memory.quantize='nf4'"], "SDXL, nf4 base"),
    "rlcm-sdxl": Row(
        "rlcm-sdxl-aesthetic",
        "sdxl",
        ["model.lcm_lora=''", "sample.sampler='lcm'"],  # the LoRA's shape is SDXL's own
        "RLCM on SDXL, 4 steps",
    ),
    "sd35m-grpo": Row("sd35m-grpo-incompressibility", "sd35m", [], "Flow-GRPO, SD 3.5 M"),
    "sd35m-nft": Row("sd35m-nft-aesthetic", "sd35m", [], "DiffusionNFT, SD 3.5 M"),
    "flux2-klein": Row(
        "flux2-klein-grpo-incompressibility", "flux2-klein", [], "Flow-GRPO, klein, nf4"
    ),
    "flux2-klein-bf16": Row(
        "flux2-klein-grpo-incompressibility",
        "flux2-klein",
        ["memory.quantize='none'"],
        "Flow-GRPO, klein, bf16 base",
    ),
    "pocket": Row("pocket-incompressibility", "pocket", [], "CPU smoke test"),
    "pocket-flow": Row("pocket-flow-grpo-incompressibility", "pocket-flow", [], "flow smoke test"),
}


def row_config(row: Row) -> Config:
    config = load_preset(row.preset)
    apply_overrides(config, row.overrides)
    validate(config)
    return config


def per_image(report: MemoryReport, images: int) -> dict[str, float]:
    return {p.name: (p.seconds or 0.0) / images for p in report.phases}


def check(name: str) -> dict[str, object]:
    row = ROWS[name]
    config = row_config(row)
    short = bench_config(config)
    measured = measure_run(config, row.arch)
    estimated = estimate_memory(short, row.arch)
    seconds = per_image(measured, short.sample.batch_size * short.sample.batches_per_epoch)
    samples = config.sample.batch_size * config.sample.batches_per_epoch
    epoch = samples * (
        seconds["sampling"] + seconds["reward"] + seconds["training"] * config.train.inner_epochs
    )
    return {
        "row": name,
        "what": row.what,
        "method": measured.method,
        "device": measured.notes[0],
        "seconds_per_image": seconds,
        "projected_epoch_seconds": epoch,
        "samples_per_epoch": samples,
        "measured_reserved": measured.peak_bytes,
        "measured_allocated": measured.peak_allocated_bytes,
        "estimated_allocated": estimated.peak_allocated_bytes,
        "estimated_reserved": estimated.peak_bytes,
        "settings": measured.settings,
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| row | what | sampling s/img | reward s/img | training s/img | epoch (projected) "
        "| reserved measured | allocated measured | allocated estimated | reserved / est. alloc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["seconds_per_image"]
        ratio = (
            f"{r['measured_reserved'] / r['estimated_allocated']:.2f}"
            if r["measured_reserved"]
            else "-"
        )
        lines.append(
            f"| {r['row']} | {r['what']} | {s['sampling']:.2f} | {s['reward']:.2f} "
            f"| {s['training']:.2f} | {r['projected_epoch_seconds'] / 60:.1f} min "
            f"({r['samples_per_epoch']} images) | {r['measured_reserved'] / GB:.2f} "
            f"| {r['measured_allocated'] / GB:.2f} | {r['estimated_allocated'] / GB:.2f} "
            f"| {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="sd15", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--json-out", default="", help="also write the results as JSON lines")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: pick from {', '.join(ROWS)}")
    results = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(check(name))
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print(f"{results[0]['device']}; GB = GiB\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
