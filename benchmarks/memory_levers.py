"""What each memory lever is worth, for SD 1.5 at 512 px: a markdown table of the
estimated peak per phase (the `bench memory` estimate, no GPU needed).

    python benchmarks/memory_levers.py > docs/memory_levers.md

On a CUDA machine, `lowvram-ddpo bench memory --preset incompressibility --set ...` measures
the same settings instead; docs/benchmarks.md keeps both where both exist.
"""

from __future__ import annotations

from lowvram_ddpo.config import apply_overrides, load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import MetaRun, estimate_memory
from lowvram_ddpo.memory.fit import fit_to_vram
from lowvram_ddpo.memory.units import GB, parse_size

PRESET = "incompressibility"
ROWS = [
    ("preset as shipped (micro-batch 1, offload, SDPA)", []),
    ("micro-batch 2", ["train.batch_size=2"]),
    ("micro-batch 4 (the reference's)", ["train.batch_size=4"]),
    ("micro-batch 4 + checkpointing", ["train.batch_size=4", "memory.gradient_checkpointing=true"]),
    ("micro-batch 1 + checkpointing", ["memory.gradient_checkpointing=true"]),
    ("no offload (text encoder, VAE stay)", ["memory.offload=false"]),
    ("sampling batch 4", ["sample.batch_size=4"]),
    (
        "sampling batch 2, checkpointing",
        ["sample.batch_size=2", "memory.gradient_checkpointing=true"],
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
PHASES = ("encode", "sampling", "decode", "reward", "training")


def gb(n: int) -> str:
    return f"{n / GB:.2f}"


def main() -> None:
    run = MetaRun(load_preset(PRESET), "sd15")
    print(f"Estimated peak reserved memory (GB = GiB) per phase, SD 1.5, 512 px, preset `{PRESET}`")
    print("with the changes listed; LoRA rank 4, fp16 base, 50 DDIM steps, guidance 5 (CFG).\n")
    print("| settings | " + " | ".join(PHASES) + " | overall |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for name, overrides in ROWS:
        config = load_preset(PRESET)
        apply_overrides(config, overrides)
        report = estimate_memory(config, "sd15", run)
        cells = [gb(report.phase(p).peak_reserved) for p in PHASES]
        print(f"| {name} | " + " | ".join(cells) + f" | **{gb(report.peak_bytes)}** |")
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
    print("\n`--vram` choices for the shipped preset:\n")
    print("| --vram | changes | predicted peak |")
    print("|---|---|---|")
    for vram in ("12GB", "8GB", "6GB", "4GB", "3GB"):
        try:
            fit = fit_to_vram(load_preset(PRESET), "sd15", parse_size(vram))
        except UserError as err:
            print(f"| {vram} | refused: {err} | - |")
            continue
        changes = "; ".join(fit.changes) or "none"
        print(f"| {vram} | {changes} | {gb(fit.report.peak_bytes)} |")


if __name__ == "__main__":
    main()
