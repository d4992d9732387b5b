"""What each memory lever is worth, for SD 1.5 at 512 px and SDXL at 1024 px: markdown
tables of the estimated peak per phase (the `bench memory` estimate, no GPU needed).

    python benchmarks/memory_levers.py > docs/memory_levers.md

On a CUDA machine, `lowvram-ddpo bench memory --preset incompressibility --set ...` measures
the same settings instead; docs/benchmarks.md keeps both where both exist.
"""

from __future__ import annotations

from lowvram_ddpo.config import apply_overrides, load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.calibration import (
    CUDA_CONTEXT_BYTES,
    INDUCTOR_TRAINING_WORKING,
    INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING,
    RESERVED_OVER_ALLOCATED,
)
from lowvram_ddpo.memory.estimate import MetaRun, estimate_memory
from lowvram_ddpo.memory.fit import fit_to_vram
from lowvram_ddpo.memory.units import GB, parse_size

PRESET = "incompressibility"
SDXL_PRESET = "sdxl-aesthetic"
ROWS = [
    ("preset as written (micro-batch 1, offload, SDPA)", []),
    ("micro-batch 2", ["train.batch_size=2"]),
    ("micro-batch 4 (the reference's)", ["train.batch_size=4"]),
    ("micro-batch 4 + checkpointing", ["train.batch_size=4", "memory.gradient_checkpointing=true"]),
    ("micro-batch 1 + checkpointing", ["memory.gradient_checkpointing=true"]),
    *(
        (
            "micro-batch 8 + checkpointing"
            + (f", uncheckpointed_levels={kept}" if kept else " (every level)"),
            [
                "train.batch_size=8",
                "memory.gradient_checkpointing=true",
                f"memory.uncheckpointed_levels={kept}",
            ],
        )
        for kept in range(4)
    ),
    (
        "micro-batch 8 + checkpointing, self-attention's outputs kept",
        ["train.batch_size=8", "memory.gradient_checkpointing=true", "memory.keep_attention=true"],
    ),
    ("no offload (text encoder, VAE stay)", ["memory.offload=false"]),
    ("sampling batch 4", ["sample.batch_size=4"]),
    (
        "sampling batch 2, checkpointing",
        ["sample.batch_size=2", "memory.gradient_checkpointing=true"],
    ),
    (
        "sampling batch 2, checkpointing, fp8 base",
        ["sample.batch_size=2", "memory.gradient_checkpointing=true", "memory.quantize='fp8'"],
    ),
    (
        "sampling batch 2, checkpointing, int8 base",
        ["sample.batch_size=2", "memory.gradient_checkpointing=true", "memory.quantize='int8'"],
    ),
    (
        "sampling batch 2, checkpointing, nf4 base",
        ["sample.batch_size=2", "memory.gradient_checkpointing=true", "memory.quantize='nf4'"],
    ),
]
SDXL_ROWS = [
    ("preset as written (sampling batch 2, checkpointing, VAE tiling, text encoders on CPU)", []),
    ("no VAE tiling (fp32 decode of the whole 1024 px image)", ["memory.vae_tiling=false"]),
    ("no checkpointing", ["memory.gradient_checkpointing=false"]),
    ("uncheckpointed_levels=1 (the 32x32 blocks)", ["memory.uncheckpointed_levels=1"]),
    ("self-attention's outputs kept", ["memory.keep_attention=true"]),
    (
        "sampling batch 4, text encoders on the card (the preset before 2026-11-25)",
        ["sample.batch_size=4", "memory.text_encoders_on_cpu=false"],
    ),
    ("sampling batch 8", ["sample.batch_size=8"]),
    ("bf16 (the VAE decodes in bf16, no fp32 upcast)", ["model.mixed_precision='bf16'"]),
    ("fp8 base", ["memory.quantize='fp8'"]),
    ("nf4 base", ["memory.quantize='nf4'"]),
]
PHASES = ("encode", "sampling", "decode", "reward", "training")


def gb(n: int) -> str:
    return f"{n / GB:.2f}"


def lever_table(preset: str, arch: str, rows: list[tuple[str, list[str]]]) -> None:
    run = MetaRun(load_preset(preset), arch)
    print("| settings | " + " | ".join(PHASES) + " | overall |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for name, overrides in rows:
        config = load_preset(preset)
        apply_overrides(config, overrides)
        # the models on the meta device are built per precision: a new run for model.* rows
        same_models = not any(o.startswith("model.") for o in overrides)
        report = estimate_memory(config, arch, run if same_models else None)
        cells = [gb(report.phase(p).peak_reserved) for p in PHASES]
        print(f"| {name} | " + " | ".join(cells) + f" | **{gb(report.peak_bytes)}** |")


def vram_table(preset: str, arch: str, sizes: tuple[str, ...]) -> None:
    print(f"\n`--vram` choices for `{preset}`:\n")
    print("| --vram | changes | predicted peak |")
    print("|---|---|---|")
    for vram in sizes:
        try:
            fit = fit_to_vram(load_preset(preset), arch, parse_size(vram))
        except UserError as err:
            print(f"| {vram} | refused: {err} | - |")
            continue
        changes = "; ".join(fit.changes) or "none"
        print(f"| {vram} | {changes} | {gb(fit.report.peak_bytes)} |")


def full_fine_tuning_table() -> None:
    print(
        "\nFull fine-tuning (`model.lora_rank=0`, fp32 master weights, micro-batch 1, "
        "checkpointing):\n"
    )
    print("| optimiser | optimiser state | overall |")
    print("|---|---|---|")
    full = load_preset(PRESET)
    apply_overrides(full, ["model.lora_rank=0", "memory.gradient_checkpointing=true"])
    full_run = MetaRun(full, "sd15")
    for optimizer in ("adamw", "adamw8bit"):
        apply_overrides(full, [f"memory.optimizer='{optimizer}'"])
        report = estimate_memory(full, "sd15", full_run)
        state = report.phase("training").held["optimizer state"]
        print(f"| {optimizer} | {gb(state)} | {gb(report.peak_bytes)} |")


def main() -> None:
    print(f"Estimated peak reserved memory (GB = GiB) per phase, SD 1.5, 512 px, preset `{PRESET}`")
    print("with the changes listed; LoRA rank 4, fp16 base, 50 DDIM steps, guidance 5 (CFG).")
    print(
        f"Reserved = {RESERVED_OVER_ALLOCATED} x the estimated allocated bytes (calibrated on an "
        "H100, docs/benchmarks.md); a card also needs "
        f"~{CUDA_CONTEXT_BYTES / GB:.0f} GiB for the CUDA context, which `--vram` subtracts."
    )
    print(
        "The preset compiles the UNet with Inductor: its training step's working memory counts "
        f"{INDUCTOR_TRAINING_WORKING} of the meta device's eager count with checkpointing "
        f"(measured on an H200 and an H100), {INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING} "
        "without (measured on an H100 at micro-batch 4; `memory/calibration.py`).\n"
    )
    lever_table(PRESET, "sd15", ROWS)
    full_fine_tuning_table()
    vram_table(PRESET, "sd15", ("12GB", "8GB", "6GB", "4GB", "3GB"))
    print(f"\n## SDXL base 1.0, 1024 px, preset `{SDXL_PRESET}`\n")
    print("LoRA rank 4, fp16 base, 50 DDIM steps, guidance 5 (CFG), the CLIP aesthetic scorer")
    print("on the card only while scoring.\n")
    lever_table(SDXL_PRESET, "sdxl", SDXL_ROWS)
    vram_table(SDXL_PRESET, "sdxl", ("12GB", "8GB", "6GB", "4GB"))


if __name__ == "__main__":
    main()
