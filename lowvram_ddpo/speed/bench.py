"""`lowvram-ddpo bench speed`: a short real run of the trainer on random-weight models,
timed per phase, with throughput and model FLOPs utilisation (MFU).

The run has two epochs (or ``epochs``) of ``batches`` sampling batches each; the first
warms up (CUDA kernels chosen, ``speed.compile`` compiling) and is reported apart; the
others are timed (their mean), and the peak memory so far after each epoch is kept:
under CUDA graphs the peak rose by 1.0-1.4 GiB from the first epoch to the second (H200
and H100, 2026-11-26), and more epochs show whether it stops there. The images per
second extrapolate to a full epoch: every phase's time is proportional to the images it
handles.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch

from lowvram_ddpo.config import Config, set_samples_per_epoch
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import estimate_memory, settings_of
from lowvram_ddpo.memory.measure import batches_per_group, run_on_random_weights
from lowvram_ddpo.memory.meter import by_phase
from lowvram_ddpo.memory.units import format_size
from lowvram_ddpo.reporting.progress import format_duration
from lowvram_ddpo.speed.compile_cache import cache_lookups, cache_lookups_line
from lowvram_ddpo.speed.devices import dense_fp16_tflops
from lowvram_ddpo.speed.flops import EpochFlops, epoch_flops
from lowvram_ddpo.speed.kernel_kinds import kernel_times, milliseconds_by_kind
from lowvram_ddpo.speed.time_model import predicted_here

PHASES = ("sampling", "reward", "training")


@dataclass
class SpeedReport:
    arch: str
    device: str
    settings: dict[str, object]
    images: int
    """Images sampled and trained on in the timed epoch."""
    seconds: dict[str, float]
    """The timed epoch: sampling (with prompt encoding and decoding), reward, training, and
    the whole epoch (less than their sum when rewards are scored while sampling goes on)."""
    warmup_seconds: float
    """The first epoch, whole (compilation included)."""
    flops: EpochFlops
    peak_tflops: float | None
    """The device's dense fp16 rate; None: unknown (no MFU)."""
    peak_reserved_bytes: int | None
    """The timed epochs' largest peak."""
    run_images: int = 0
    """Images of the whole run as configured (epochs x images per epoch): what the timed
    epoch's rate extrapolates to (0: not given)."""
    notes: list[str] = field(default_factory=list)
    timed_epoch_seconds: list[float] = field(default_factory=list)
    """Each timed epoch, whole: the spread behind the mean."""
    predicted: dict[str, object] = field(default_factory=dict)
    """The time model's seconds per image of sampling and training on this card (CUDA
    only; ``speed.time_model``, what ``--vram`` ranks settings by), beside the measured."""
    peak_so_far_by_epoch: list[dict[str, int]] = field(default_factory=list)
    """The run's peak reserved bytes so far at the end of each epoch, overall and per phase
    (the warm-up first; the trainer's meter keeps the largest): a rise shows growth."""
    graph_events_by_epoch: list[dict[str, int]] = field(default_factory=list)
    """Under CUDA graphs, each epoch's recordings, warm-up runs and pool restores
    (``speed.cuda_graphs.count_graph_events``; the warm-up epoch first): after the first
    epoch there should be none."""
    estimated_peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    """The memory estimate of the same settings, per phase: {"reserved": bytes,
    "allocated": bytes} (``estimate_memory``, what ``--vram`` fits by), beside the
    measured peaks: each GPU row is also the estimate's calibration check."""
    recomputed_per_image: float = 0.0
    """The UNet FLOPs gradient checkpointing computes again per image (its second forward):
    done by the GPU, not counted by MFU (``mfu_with_recomputation``)."""
    replay: dict[str, float] = field(default_factory=dict)
    """The replay of the epoch that missed most (``epoch_metrics.TrainingTotals``):
    log-probs re-scored before the first update against the sampled ones, rms and the
    share clipped, beside the clip range; empty where the objective clips nothing."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """The timed epoch's seconds by the phase meter's phases, each between device
    synchronisations: "sampling" is the denoising alone (and any prompt encoding), beside
    "decode", "training" and "reward" where it is not overlapped."""
    compile_cache: dict[str, int] = field(default_factory=dict)
    """The run's compile-cache lookups (``compile_cache.cache_lookups``): whether the
    warm-up's compile came from an earlier run's, and what no run can cache."""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds["epoch"]

    def images_per_second_range(self) -> tuple[float, float] | None:
        """The slowest and fastest timed epoch's images per second, where several were
        timed: identical runs' single epochs differed by 6% on an H200 (2026-11-27), so a
        ratio is read against this spread (None with one timed epoch)."""
        if len(self.timed_epoch_seconds) < 2:
            return None
        return self.images / max(self.timed_epoch_seconds), self.images / min(
            self.timed_epoch_seconds
        )

    @property
    def run_seconds(self) -> float:
        """The configured run at the timed epoch's rate (warm-up and grids left out)."""
        return self.run_images / self.images_per_second

    def seconds_per_image(self, phase: str) -> float:
        return self.seconds[phase] / self.images

    def mfu(self, phase: str) -> float | None:
        """Useful UNet FLOPs / seconds / the device's dense fp16 rate."""
        if self.peak_tflops is None:
            return None
        useful = {
            "sampling": self.flops.sampling_per_image,
            "training": self.flops.training_per_image,
            "epoch": self.flops.sampling_per_image + self.flops.training_per_image,
        }[phase]
        return useful * self.images / self.seconds[phase] / (self.peak_tflops * 1e12)

    def mfu_denoising(self) -> float | None:
        """Sampling's MFU over the denoising alone (the decode and the loop's host work left
        out): how busy the UNet's calls keep the device while sampling."""
        denoising = self.phase_seconds.get("sampling")
        if self.peak_tflops is None or not denoising:
            return None
        useful = self.flops.sampling_per_image * self.images
        return useful / denoising / (self.peak_tflops * 1e12)

    def mfu_with_recomputation(self) -> float | None:
        """The training's MFU counting checkpointing's second forward too: what the GPU's
        arithmetic ran at, against what the run needed (``mfu``); the gap is the cost of
        the memory checkpointing saves."""
        mfu = self.mfu("training")
        if mfu is None or not self.flops.training_per_image:
            return mfu
        return mfu * (1 + self.recomputed_per_image / self.flops.training_per_image)

    def sampling_split_line(self) -> str:
        """Sampling's seconds split by the phase meter: the denoising (its MFU beside) and
        the decode ("" where the meter timed neither)."""
        denoising, decode = self.phase_seconds.get("sampling"), self.phase_seconds.get("decode")
        if denoising is None or decode is None:
            return ""
        mfu = self.mfu_denoising()
        return (
            f"    of which denoising {denoising:.2f} s"
            + (f" (MFU {mfu:.1%})" if mfu is not None else "")
            + f", decoding {decode:.2f} s ({decode / self.images:.3f} s/image)"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "device": self.device,
            "images": self.images,
            "images_per_second": self.images_per_second,
            "images_per_second_range": self.images_per_second_range(),
            "seconds": self.seconds,
            "seconds_per_image": {p: self.seconds_per_image(p) for p in self.seconds},
            "warmup_seconds": self.warmup_seconds,
            "mfu": {p: self.mfu(p) for p in ("sampling", "training", "epoch")},
            "mfu_training_with_recomputation": self.mfu_with_recomputation(),
            "mfu_denoising": self.mfu_denoising(),
            "phase_seconds": self.phase_seconds,
            "peak_tflops": self.peak_tflops,
            "unet_tflop_per_image": {
                "sampling": self.flops.sampling_per_image / 1e12,
                "training": self.flops.training_per_image / 1e12,
                "forward_per_latent": self.flops.forward_per_latent / 1e12,
            },
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "timed_epoch_seconds": self.timed_epoch_seconds,
            "time_model": self.predicted,
            "memory_estimate": self.estimated_peaks,
            "peak_so_far_by_epoch": self.peak_so_far_by_epoch,
            "cuda_graph_events_by_epoch": self.graph_events_by_epoch,
            "replay": self.replay,
            "compile_cache": self.compile_cache,
            "run": {"images": self.run_images, "seconds": self.run_seconds},
            "settings": self.settings,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [f"speed of one epoch, {self.arch}, on {self.device} ({self.images} images):"]
        for phase in (*PHASES, "epoch"):
            mfu = self.mfu(phase) if phase != "reward" else None
            again = self.mfu_with_recomputation() if phase == "training" else None
            lines.append(
                f"  {phase:<9} {self.seconds[phase]:8.2f} s  {self.seconds_per_image(phase):7.3f} "
                "s/image"
                + (f"  MFU {mfu:.1%}" if mfu is not None else "")
                + (
                    f" ({again:.1%} counting checkpointing's recomputation)"
                    if again is not None and self.recomputed_per_image
                    else ""
                )
            )
            if phase == "sampling" and (split := self.sampling_split_line()):
                lines.append(split)
        spread = self.images_per_second_range()
        lines.append(
            f"  throughput {self.images_per_second:.3f} images/s"
            + (
                f" ({spread[0]:.3f}-{spread[1]:.3f} over {len(self.timed_epoch_seconds)} "
                "timed epochs)"
                if spread
                else ""
            )
            + f"; warm-up epoch {self.warmup_seconds:.1f} s"
        )
        if self.peak_reserved_bytes is not None:
            by_epoch = ", ".join(
                format_size(p["peak_reserved_bytes"]) for p in self.peak_so_far_by_epoch
            )
            allocated = [p.get("peak_allocated_bytes") for p in self.peak_so_far_by_epoch]
            lines.append(
                f"  peak reserved {format_size(self.peak_reserved_bytes)}"
                + (f" (the peak so far after each epoch: {by_epoch})" if by_epoch else "")
                + (
                    f", allocated {format_size(allocated[-1])}"
                    if allocated and allocated[-1]
                    else ""
                )
            )
        last = self.peak_so_far_by_epoch[-1] if self.peak_so_far_by_epoch else {}
        if phases := phase_peaks_line(last):
            lines.append(phases)
        if phases and self.estimated_peaks:  # none where the estimate failed (a note says)
            lines.append(
                "  the memory estimate by phase, reserved / allocated: "
                + ", ".join(
                    f"{phase} {format_size(p['reserved'])} / {format_size(p['allocated'])}"
                    for phase, p in self.estimated_peaks.items()
                )
            )
        if cache := cache_lookups_line(self.compile_cache):
            lines.append(cache)
        if self.graph_events_by_epoch:
            recorded = ", ".join(str(e["cuda_graph_recorded"]) for e in self.graph_events_by_epoch)
            lines.append(f"  CUDA graphs recorded in each epoch: {recorded}")
        if self.replay:
            r = self.replay
            lines.append(
                f"  replay before the first update: {r['replay_rms']:.2e} rms "
                f"({r['replay_rms'] / r['clip_range']:.2f} of the clip range "
                f"{r['clip_range']:g}), {r['replay_clipfrac']:.1%} of those actions clipped"
            )
        if self.run_images:
            lines.append(
                f"  the whole run as configured ({self.run_images} images): "
                f"~{format_duration(self.run_seconds)} at this rate"
            )
        if self.predicted:
            p = self.predicted
            lines.append(
                f"  the time model on {p['gpu']}: sampling {p['sampling']:.3f}, training "
                f"{p['training']:.3f} s/image (measured over predicted: "
                f"{self.seconds_per_image('sampling') / p['sampling']:.2f}, "
                f"{self.seconds_per_image('training') / p['training']:.2f})"
            )
        lines.append(
            f"UNet work per image: sampling {self.flops.sampling_per_image / 1e12:.3g} TFLOP, "
            f"training {self.flops.training_per_image / 1e12:.3g} TFLOP"
        )
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def phase_peaks_line(peaks: dict[str, int]) -> str:
    """Each phase's own peak, reserved / allocated ("" without CUDA figures): which phase
    holds the run's peak, and how much of it is the allocator's cache, not memory in use."""
    phases = by_phase(peaks)
    if not phases:
        return ""
    return "  peak by phase, reserved / allocated: " + ", ".join(
        f"{phase} {format_size(reserved)} / {format_size(allocated)}"
        for phase, (reserved, allocated) in phases.items()
    )


def speed_config(config: Config, batches: int, epochs: int = 2) -> Config:
    """``epochs`` epochs of ``batches`` sampling batches; optimiser steps shrink to fit."""
    if epochs < 2:
        raise ValueError("a speed run needs a warm-up epoch and a timed one")
    cfg = copy.deepcopy(config)
    cfg.run.epochs = epochs
    cfg.run.progress = False
    # no grids: they are not the epoch (and they render eagerly even under speed.compile)
    cfg.run.grid_every = -1
    cfg.run.eval_every = 0
    cfg.run.checkpoint_every = 10**9  # the last epoch still writes one, outside the timing
    whole = batches_per_group(cfg.sample.batch_size, cfg.sample.group_size)
    if batches % whole:
        raise UserError(
            f"--batches {batches} samples {cfg.sample.batch_size * batches} images an epoch, "
            f"not whole groups of {cfg.sample.group_size} (sample.group_size): give --batches "
            f"{whole} or a multiple of it"
        )
    set_samples_per_epoch(cfg, cfg.sample.batch_size * batches)
    return cfg


def cudagraph_skips() -> int:
    """Graphs that cudagraph trees declined to record in this process (an op they cannot
    capture, a CPU tensor): the speed-up a CUDA-graph mode lost."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def measure_speed(
    config: Config,
    arch: str,
    batches: int = 2,
    peak_tflops: float | None = None,
    epochs: int = 2,
    profile: Path | None = None,
) -> SpeedReport:
    """Time ``config``'s epoch on this machine's accelerator with random-weight models:
    a warm-up epoch, then ``epochs - 1`` timed ones (their mean). ``profile``: a file for
    the last epoch's profile (``epoch_profile``); that epoch, slowed by the profiler, is
    left out of the timing when another follows the warm-up (``epochs`` >= 3: one GPU
    call gets the speed and where it goes, paying the compile once)."""
    cfg = speed_config(config, batches, epochs)
    run_images = config.run.epochs * config.sample.batch_size * config.sample.batches_per_epoch
    flops = epoch_flops(cfg, arch)
    around = (lambda: epoch_profile(profile)) if profile else nullcontext
    looked_up_before = cache_lookups()  # the process's counts: this run's are the rise
    ran, _ = run_on_random_weights(cfg, arch, around)
    warmup, *timed = ran
    profiled_apart = profile is not None and len(timed) >= 2
    if profiled_apart:
        timed = timed[:-1]  # the seconds; memory and replay from every epoch that ran
    on_cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if on_cuda else "cpu"
    rate = peak_tflops or (dense_fp16_tflops(name) if on_cuda else None)
    notes = []
    lookups = {k: n - looked_up_before[k] for k, n in cache_lookups().items()}
    if lookups["inductor_bypassed"] or lookups["aot_autograd_bypassed"]:
        notes.append(
            "some compiled graphs bypassed the compile cache: every run compiles them again "
            "(the compile lines say which call's; speed/compile_cache.py)"
        )
    skips = cudagraph_skips()
    if skips:
        notes.append(
            f"CUDA graphs were skipped {skips} time(s): those UNet calls ran without graphs "
            "(the log says why)"
        )
    if rate is None:
        notes.append("no MFU: this device's dense fp16 rate is not listed; give --peak-tflops")
    if profiled_apart:
        notes.append(
            f"the last epoch ran under the profiler (its table: {profile}), outside the "
            "timing: the seconds are the epochs between it and the warm-up"
        )
    elif profile:
        notes.append(
            f"the last epoch ran under the profiler (its table: {profile}): its seconds "
            "include the profiler's own overhead (--epochs 3 keeps it out of the timing)"
        )
    return SpeedReport(
        arch=arch,
        device=name,
        settings=settings_of(cfg),
        images=timed[0]["samples"],
        seconds={p: mean(e[f"seconds_{p}"] for e in timed) for p in (*PHASES, "epoch")},
        warmup_seconds=warmup["seconds_epoch"],
        flops=flops,
        peak_tflops=rate,
        peak_reserved_bytes=max(e["peak_reserved_bytes"] for e in ran[1:]) if on_cuda else None,
        run_images=run_images,
        notes=notes,
        timed_epoch_seconds=[e["seconds_epoch"] for e in timed],
        predicted=time_model_per_image(cfg, arch, flops) if on_cuda else {},
        estimated_peaks=estimated_peaks(cfg, arch, notes),
        peak_so_far_by_epoch=[_peaks(e) for e in ran] if on_cuda else [],
        graph_events_by_epoch=[
            {k: v for k, v in e.items() if k.startswith("cuda_graph_")}
            for e in ran
            if "cuda_graph_recorded" in e
        ],
        recomputed_per_image=flops.recomputed_per_step(cfg.memory, cfg.sample.num_steps)
        * flops.trained_steps
        * cfg.train.inner_epochs,
        replay=worst_replay(ran, cfg.train.clip_range),
        compile_cache=lookups,
        phase_seconds=timed_phase_seconds(timed),
    )


def timed_phase_seconds(timed: list[dict]) -> dict[str, float]:
    """The timed epochs' mean seconds per phase of the phase meter (their
    ``phase_seconds_<phase>`` metrics)."""
    prefix = "phase_seconds_"
    names = [k.removeprefix(prefix) for k in timed[0] if k.startswith(prefix)]
    return {name: mean(e.get(prefix + name, 0.0) for e in timed) for name in names}


def estimated_peaks(config: Config, arch: str, notes: list[str]) -> dict[str, dict[str, int]]:
    """The memory estimate's peaks per phase for ``config``; where the estimate cannot be
    made, a note says why and the measured row stands without it (it comes after minutes
    of GPU time)."""
    try:
        report = estimate_memory(config, arch)
    except Exception as error:  # noqa: BLE001  (any: the measurement is what matters)
        notes.append(f"no memory estimate beside the measured peaks: {error}")
        return {}
    return {
        p.name: {"reserved": p.peak_reserved, "allocated": p.peak_allocated} for p in report.phases
    }


def worst_replay(epochs: list[dict], clip_range: float) -> dict[str, float]:
    """The replay of the epoch that missed most (``replay_rms``, its ``replay_clipfrac``)
    beside ``clip_range``; empty where none was measured."""
    measured = [e for e in epochs if e.get("replay_clipfrac") is not None]
    if not measured:
        return {}
    worst = max(measured, key=lambda e: (e["replay_rms"], e["replay_clipfrac"]))
    return {
        "replay_rms": worst["replay_rms"],
        "replay_clipfrac": worst["replay_clipfrac"],
        "clip_range": clip_range,
    }


def time_model_per_image(config: Config, arch: str, flops: EpochFlops) -> dict[str, object]:
    """What ``speed.time_model`` predicts per image of ``config``'s epoch on this card: a
    GPU session's bench rows are then also its calibration check."""
    epoch, gpu = predicted_here(config, arch, flops)
    images = config.sample.batch_size * config.sample.batches_per_epoch
    return {
        "gpu": gpu.name,
        "sampling": epoch.sampling / images,
        "training": epoch.training / images,
    }


PROFILE_ROWS = 30


@contextmanager
def epoch_profile(path: Path) -> Iterator[None]:
    """PyTorch's profiler around an epoch; its operators' totals go to ``path`` as two
    tables: by time on the accelerator (what the GPU spends an epoch on) and by time on the
    host (what the GPU may wait for: launches, copies, Python)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        yield
    averages = prof.key_averages()
    on_device = torch.cuda.is_available()
    by_device = "self_device_time_total" if on_device else "self_cpu_time_total"
    timed = kernel_times(prof.events(), on_device)
    kinds = milliseconds_by_kind(timed)
    what = "kernels" if on_device else "operators' self time"
    path.write_text(
        f"{what}: {sum(us for _, us in timed) / 1000:.1f} ms in all; by kind (ms): "
        + ", ".join(f"{kind} {ms}" for kind, ms in kinds.items())
        + f"\nby time on the device ({by_device}; an operator's row repeats its kernels'):\n"
        + averages.table(sort_by=by_device, row_limit=PROFILE_ROWS)
        + "\nby time on the host (cpu_time_total):\n"
        + averages.table(sort_by="cpu_time_total", row_limit=PROFILE_ROWS)
    )


def _peaks(epoch: dict) -> dict[str, int]:
    kinds = (
        "peak_reserved",
        "peak_allocated",
        "peak_stranded",
        "start_reserved",
        "start_allocated",
    )
    return {k: v for k, v in epoch.items() if k.startswith(kinds)}
