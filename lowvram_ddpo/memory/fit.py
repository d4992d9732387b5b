"""`--vram 8GB`: choose the memory levers that fit a card, from the estimate.

Levers are tried from the cheapest in time to the dearest: first the largest sampling
batch (and scoring batch, for reward models) that fits; for training, smaller
micro-batches (free on a GPU that a 512 px batch already fills); above 512 px, VAE
tiling (a few more decoder passes); then gradient checkpointing (~30% slower training),
then the text encoders on the CPU (slow only while new prompts arrive), and last a
4-bit frozen base. The images per epoch and per optimiser step never change:
a smaller batch means more batches, or more accumulation steps.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from lowvram_ddpo.config import Config
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.calibration import CUDA_CONTEXT_BYTES, a_card
from lowvram_ddpo.memory.estimate import MetaRun, estimate_memory
from lowvram_ddpo.memory.report import MemoryReport
from lowvram_ddpo.memory.units import GB, format_size
from lowvram_ddpo.models import VAE_TILE_PIXELS


@dataclass
class Fit:
    config: Config
    report: MemoryReport
    changes: list[str]

    def summary(self, vram: str) -> str:
        changed = "; ".join(self.changes) if self.changes else "the settings as given"
        return (
            f"--vram {vram}: {changed}; predicted peak {format_size(self.report.peak_bytes)} "
            f"reserved + ~{format_size(CUDA_CONTEXT_BYTES)} CUDA context ({self.report.method})"
        )


def _halvings(value: int, total: int) -> list[int]:
    """value, value/2, ..., 1, keeping only divisors of ``total``."""
    options, v = [], value
    while v >= 1:
        if total % v == 0:
            options.append(v)
        v //= 2
    return options or [1]


def candidates(config: Config, quantize: str, text_on_cpu: bool) -> Iterator[Config]:
    """Settings in order of preference (cheapest in time first)."""
    s, t = config.sample, config.train
    samples = s.batch_size * s.batches_per_epoch
    per_step = t.batch_size * t.gradient_accumulation_steps
    checkpointing = [False, True] if not config.memory.gradient_checkpointing else [True]
    # tiles only exist above their size; a few more decode passes cost less than recomputing
    # the UNet in every backward, so tiling comes before checkpointing
    tiles = s.resolution > VAE_TILE_PIXELS and not config.memory.vae_tiling
    tiling = [False, True] if tiles else [config.memory.vae_tiling]
    scoring = _halvings(config.reward.batch_size, config.reward.batch_size)
    for ckpt, tiled in itertools.product(checkpointing, tiling):
        for micro in _halvings(t.batch_size, per_step):
            # a smaller scoring batch (reward models) costs the least: it is tried first
            for batch, scored in itertools.product(_halvings(s.batch_size, samples), scoring):
                trial = copy.deepcopy(config)
                trial.memory.gradient_checkpointing = ckpt
                trial.memory.vae_tiling = tiled
                trial.memory.quantize = quantize
                trial.memory.text_encoders_on_cpu = text_on_cpu
                trial.train.batch_size = micro
                trial.train.gradient_accumulation_steps = per_step // micro
                trial.sample.batch_size = batch
                trial.sample.batches_per_epoch = samples // batch
                trial.reward.batch_size = scored
                yield trial


def describe_changes(before: Config, after: Config) -> list[str]:
    keys = [
        ("sample", "batch_size"),
        ("sample", "batches_per_epoch"),
        ("train", "batch_size"),
        ("train", "gradient_accumulation_steps"),
        ("reward", "batch_size"),
        ("memory", "gradient_checkpointing"),
        ("memory", "vae_tiling"),
        ("memory", "text_encoders_on_cpu"),
        ("memory", "quantize"),
    ]
    changes = []
    for section, name in keys:
        old, new = getattr(getattr(before, section), name), getattr(getattr(after, section), name)
        if old != new:
            changes.append(f"{section}.{name} {old} -> {new}")
    return changes


def fit_to_vram(config: Config, arch: str, vram_bytes: int) -> Fit:
    """The first candidate whose estimated peak fits ``vram_bytes`` minus the CUDA context."""
    budget = vram_bytes - CUDA_CONTEXT_BYTES
    run = MetaRun(config, arch)
    quantizations = [config.memory.quantize]
    if config.memory.quantize == "none" and config.model.lora_rank > 0:
        quantizations.append("nf4")
    # text encoders on the CPU cost time only while new prompts arrive: before nf4
    on_cpu = [True] if config.memory.text_encoders_on_cpu else [False, True]
    smallest = None
    for quantize, text_on_cpu in itertools.product(quantizations, on_cpu):
        for trial in candidates(config, quantize, text_on_cpu):
            report = estimate_memory(trial, arch, run)
            if report.peak_bytes <= budget:
                return Fit(trial, report, describe_changes(config, trial))
            smallest = report if smallest is None else min(smallest, report, key=_peak)
    assert smallest is not None
    raise UserError(
        f"nothing fits in {format_size(vram_bytes)}: the smallest setting needs "
        f"{format_size(smallest.peak_bytes + CUDA_CONTEXT_BYTES)} with the CUDA context. "
        "Lower sample.resolution, or use a bigger card"
    )


def _peak(report: MemoryReport) -> int:
    return report.peak_bytes


HINT_CARD_SIZES_GB = (4, 6, 8, 12, 16, 24)
"""Card sizes hobbyists have, for `bench memory`'s hint."""


def smaller_card_hint(config: Config, arch: str, card_gb: int | None) -> str:
    """What `--vram` picks for the next common card size below ``card_gb``, the one the
    settings need ("" when there is none smaller)."""
    smaller = [size for size in HINT_CARD_SIZES_GB if size < (card_gb or 99)]
    if not smaller:
        return ""
    size = smaller[-1]
    try:
        fit = fit_to_vram(config, arch, size * GB)
    except UserError:
        return f"on {a_card(size)} nothing fits: lower sample.resolution"
    return f"for {a_card(size)}: {fit.summary(f'{size}GB')}"
