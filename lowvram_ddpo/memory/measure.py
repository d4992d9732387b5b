"""`bench memory` on a CUDA GPU: one real (shortened) DDPO epoch of the trainer on
random-weight models, with the peak memory and seconds of each phase."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from lowvram_ddpo.architectures import random_pipeline
from lowvram_ddpo.config import BITSANDBYTES_QUANTIZE, Config
from lowvram_ddpo.memory.calibration import GRAPHS_LATER_EPOCH_GROWTH
from lowvram_ddpo.memory.estimate import settings_of
from lowvram_ddpo.memory.meter import PhaseMeter
from lowvram_ddpo.memory.report import MemoryReport
from lowvram_ddpo.memory.units import format_size
from lowvram_ddpo.models import DTYPES, load_quantized_unet
from lowvram_ddpo.rewards import reward_with_random_weights
from lowvram_ddpo.speed.compile import graphs_replay


def bench_config(config: Config) -> Config:
    """One group of sampling batches (one batch unless ``sample.group_size`` spans several:
    GRPO's advantages need whole groups), trained on at every step, then stop."""
    cfg = copy.deepcopy(config)
    cfg.run.epochs = 1
    cfg.run.progress = False
    cfg.run.grid_prompts, cfg.run.grid_seeds, cfg.run.grid_every = cfg.run.grid_prompts[:1], [0], 0
    cfg.reward.overlap = "off"  # each phase measured alone
    cfg.train.batch_size = min(cfg.train.batch_size, cfg.sample.batch_size)
    cfg.train.gradient_accumulation_steps = cfg.sample.batch_size // cfg.train.batch_size
    cfg.sample.batch_size = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    # of the batch as it now is (whole micro-batches may have shrunk it)
    cfg.sample.batches_per_epoch = batches_per_group(cfg.sample.batch_size, cfg.sample.group_size)
    return cfg


def trained_steps_note(cfg: Config) -> str:
    if cfg.train.timestep_fraction >= 1 and not cfg.sample.sde_window:
        return "every step trained"
    return "the steps trained as configured"


def sampling_batches_note(batches: int, group_size: int) -> str:
    if batches == 1:
        return "one sampling batch"
    return f"{batches} sampling batches (a whole group of {group_size} images of one prompt)"


def batches_per_group(batch_size: int, group_size: int) -> int:
    """The fewest sampling batches of ``batch_size`` images that hold whole groups of
    ``group_size`` (Flow-GRPO's 8 per prompt in batches of 4: 2)."""
    return max(group_size, 1) // math.gcd(batch_size, max(group_size, 1))


def quantized_copy(unet: torch.nn.Module, dtype: torch.dtype, quantize: str) -> torch.nn.Module:
    """The random-weight UNet through the real quantised loading path (saved, then loaded
    with bitsandbytes), so that the measured run holds what a user's would."""
    with tempfile.TemporaryDirectory() as folder:
        unet.save_pretrained(folder)
        return load_quantized_unet(folder, dtype, quantize, subfolder="", model_class=type(unet))


def release_device_memory() -> None:
    """Free the models of a finished run now. With fp16/bf16, accelerate's ``prepare``
    stores the UNet's own bound methods in the UNet, a reference cycle that only Python's
    cyclic collector breaks: several runs in one process (gpu_checks' rows) otherwise find
    the previous run's UNet still on the card (1.7 GB for SD 1.5, measured in the nf4 row
    of the first H100 run)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_on_random_weights(
    cfg: Config, arch: str, around_last_epoch: Callable[[], AbstractContextManager] = nullcontext
) -> tuple[list[dict], PhaseMeter]:
    """Train ``cfg`` (already shortened) on random-weight models of ``arch`` on this
    machine's accelerator: the per-epoch metrics and the phase meter. The last epoch runs
    inside ``around_last_epoch()`` (``bench speed --profile``: a profiler, once warm). The
    models are freed before it returns. A decode or scoring width the run narrowed after
    running out of memory is written back into ``cfg`` (the trainer's log says so), and so
    are the precision and optimiser that ran where this machine could not run those asked
    for: the report's settings are then those its last epochs ran with."""
    from lowvram_ddpo.trainer import Trainer

    release_device_memory()  # what an earlier measurement in this process left behind
    # random init is quicker on the GPU; the trainer then offloads what it offloads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the trainer runs a GPU preset in fp32 on the CPU and casts no pipeline it is given:
    # its weights must come in the precision it will run
    dtype = DTYPES[cfg.model.mixed_precision] if device == "cuda" else torch.float32
    pipe = random_pipeline(arch, dtype, device)
    if cfg.memory.quantize in BITSANDBYTES_QUANTIZE:  # fp8: the trainer converts
        quantized = quantized_copy(pipe.unet, dtype, cfg.memory.quantize)
        if getattr(pipe, "transformer", None) is not None:  # SD 3: the transformer it is
            pipe.transformer = quantized
        pipe.unet = quantized
    # reward models too: random weights from their configs, nothing downloaded
    reward = reward_with_random_weights(cfg.reward, dtype, device)
    given, cfg = cfg, copy.deepcopy(cfg)
    cfg.run.log_with = "none"  # a benchmark's throwaway run: no TensorBoard events
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(cfg, Path(folder), pipeline=pipe, reward=reward)
        trainer.run_epoch = _last_epoch_inside(
            trainer.run_epoch, cfg.run.epochs - 1, around_last_epoch
        )
        # its epoch lines go to stderr: a benchmark's standard output is its report alone
        # (`bench speed --json > speed.json`)
        with contextlib.redirect_stdout(sys.stderr):
            history = trainer.fit()
    given.memory.decode_batch, given.memory.vae_tiling = (
        cfg.memory.decode_batch,
        cfg.memory.vae_tiling,
    )
    given.reward.batch_size = cfg.reward.batch_size  # narrowed, if it ran out of memory
    # what ran where the machine could not run what was asked (fp32 on a CPU, AdamW
    # without bitsandbytes): a report's settings are those its figures came from
    given.model.mixed_precision = trainer.accelerator.mixed_precision
    given.memory.optimizer = trainer.optimizer_kind
    meter = trainer.meter
    del trainer, pipe, reward
    release_device_memory()
    return history, meter


def _last_epoch_inside(
    run_epoch: Callable[[int], dict], last: int, around: Callable[[], AbstractContextManager]
) -> Callable[[int], dict]:
    def run(epoch: int) -> dict:
        with around() if epoch == last else nullcontext():
            return run_epoch(epoch)

    return run


def measure_run(config: Config, arch: str) -> MemoryReport:
    """Run the shortened epoch on this machine's accelerator. Without CUDA only the seconds
    mean something (method "cpu", peaks 0): the tests use that to exercise this path."""
    cfg = bench_config(config)
    _, meter = run_on_random_weights(cfg, arch)
    phases = [
        meter.phases[p]
        for p in ("encode", "sampling", "decode", "reward", "training")
        if p in meter.phases
    ]
    on_cuda = torch.cuda.is_available()
    return MemoryReport(
        method="cuda" if on_cuda else "cpu",
        arch=arch,
        settings=settings_of(cfg),
        phases=phases,
        notes=[
            f"device: {torch.cuda.get_device_name() if on_cuda else 'cpu (no memory figures)'}",
            "encode: every prompt, before the first epoch; each phase starts on a released "
            "allocator cache; "
            + sampling_batches_note(cfg.sample.batches_per_epoch, cfg.sample.group_size)
            + f", {cfg.sample.num_steps} steps, {trained_steps_note(cfg)}",
            *([GRAPHS_ONE_EPOCH_NOTE] if graphs_replay(cfg.speed, "training") else []),
        ],
    )


GRAPHS_ONE_EPOCH_NOTE = (
    "CUDA graphs: one epoch measured, which also records them; later epochs reserved up to "
    f"{format_size(GRAPHS_LATER_EPOCH_GROWTH)} more under speed.compile=cudagraphs (H200 and "
    "H100, 2026-11-26; the estimate adds it), the decode's working memory beside the pool "
    "under reduce-overhead (H100, 2026-11-27): `lowvram-ddpo bench speed --epochs 3` shows "
    "the peak after each epoch"
)
