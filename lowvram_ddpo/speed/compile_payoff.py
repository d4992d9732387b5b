"""Whether Inductor's compile pays for a run: it costs minutes once, at the run's first
calls, and saves a share of every epoch after. A short run (a first try of a preset, a
smoke test of a few batches) can lose more than it gains, so a preset's Inductor mode is
turned off where the run is predicted to save less than a cold compile costs (the point
"off where it does not pay (short runs, CPU)" of issue 12; without a CUDA card it is off
anyway, ``memory.fit.compile_where_it_runs``).

Where Inductor's ``default`` mode compiles the whole UNet (``speed.compile_scope``) and
the user did not choose the scope, its blocks are weighed too: a shorter first compile
(158 s against 290 on an H100) for epochs 5-14% slower, so a run too short for the whole
UNet's compile may still pay for the blocks', and the scope whose compile plus the run's
UNet time is predicted least is taken.

Only a cold compile is weighed: where the compile cache already holds kernels (an earlier
run on this machine), most of the compile may come from it (on the CPU the pocket model's
151 s fell to 15 s; on a GPU the checkpointed training graph only since
``compile_cache.keep_training_graph_cacheable``), and the mode is kept.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from lowvram_ddpo.config import BLOCK_COMPILE_MODES, COMPILE_SCOPES, INDUCTOR_MODES, Config
from lowvram_ddpo.memory.estimate import meta_run
from lowvram_ddpo.reporting.progress import format_duration
from lowvram_ddpo.speed.compile_cache import compile_cache_dir
from lowvram_ddpo.speed.flops import epoch_flops
from lowvram_ddpo.speed.time_model import Gpu, decode_seconds, leaf_modules, predict_epoch

COLD_COMPILE_SECONDS = {"model": 290.0, "blocks": 158.0}
"""Inductor's compile of SD 1.5's sampling and training calls with an empty cache, by
``speed.compile_scope``: the whole UNet's warm-up epoch took 290 s where a warmed one took
11 (micro-batch 8 with checkpointing, one H100, 2026-11-26; 233 s fitted to 7 GB on
2026-11-27), compiled by blocks 158 s (2026-11-27; docs/benchmarks.md). Most of it runs on
the host's CPU: a slower PC takes longer, so these are the least a hobbyist's machine is
expected to take."""


def run_saving(config: Config, arch: str, gpu: Gpu) -> tuple[float, float]:
    """(seconds the run's UNet work takes eager, seconds ``config``'s compile mode saves of
    it), by the time model, over the run's epochs."""
    flops = epoch_flops(config, arch, count_backward=False)
    modules = leaf_modules(meta_run(config, arch).parts.unet)
    eager = copy.deepcopy(config)
    eager.speed.compile = "off"
    eager_epoch = predict_epoch(eager, flops, gpu, modules).total
    compiled_epoch = predict_epoch(config, flops, gpu, modules).total
    epochs = config.run.epochs
    return eager_epoch * epochs, (eager_epoch - compiled_epoch) * epochs


def cold_compile_seconds(config: Config) -> float:
    """The least a cold compile of ``config``'s UNet takes (``COLD_COMPILE_SECONDS``)."""
    return COLD_COMPILE_SECONDS[config.speed.compile_scope]


def cold_compile_ahead(config: Config) -> bool:
    """Whether ``config`` compiles with Inductor before any run on this machine compiled
    its UNet so (``cache_holds_kernels``): the one case ``unpaid_compile`` weighs
    (checked first: it reads no model)."""
    return config.speed.compile in INDUCTOR_MODES and not cache_holds_kernels(config)


def unpaid_compile(config: Config, arch: str, gpu: Gpu) -> str:
    """Why a cold compile of ``config``'s Inductor mode does not pay for its run on ``gpu``
    ("" where it does): predicted to save less than the compile costs."""
    eager, saved = run_saving(config, arch, gpu)
    compiling = cold_compile_seconds(config)
    if saved >= compiling:
        return ""
    return (
        f"a run this short does not pay the first compile: ~{format_duration(saved)} "
        f"saved of ~{format_duration(eager)} against ~{format_duration(compiling)} "
        f"or more of compiling (time model; --set speed.compile={config.speed.compile} "
        "compiles anyway and fills the cache for later runs)"
    )


DECODER_COLD_COMPILE_SECONDS = 18.0
"""The VAE decoder's compile for the run's decode shape with an empty cache: 18.0 and 18.3
s (SD 1.5's VAE at 512 px, 2 and 4 images per call; H200, 2026-11-27,
`benchmarks/decode_batch.py`'s first call). Mostly the host's work: a hobbyist's PC
likely takes longer."""


def unpaid_decoder_compile(config: Config, arch: str, gpu: Gpu) -> str:
    """Why a cold compile of the VAE's decoder (``speed.compile_decoder``) does not pay for
    ``config``'s run on ``gpu`` ("" where it does, or where the decode is tiled: then
    nothing compiles, and the run says so): its decodes predicted to save less than
    ``DECODER_COLD_COMPILE_SECONDS``."""
    if config.memory.vae_tiling or cache_holds_kernels(config, "decoder"):
        return ""
    flops = epoch_flops(config, arch, count_backward=False)
    eager = copy.deepcopy(config)
    eager.speed.compile_decoder = False
    per_epoch = decode_seconds(eager, flops, gpu) - decode_seconds(config, flops, gpu)
    saved = per_epoch * config.run.epochs
    if saved >= DECODER_COLD_COMPILE_SECONDS:
        return ""
    return (
        f"a run this short does not pay the decoder's first compile: ~{format_duration(saved)} "
        f"of decoding saved against ~{format_duration(DECODER_COLD_COMPILE_SECONDS)} or more "
        "of compiling (time model; --set speed.compile_decoder=true compiles anyway)"
    )


COMPILED_MARKS = "lowvram-ddpo-compiled"
"""The cache folder's subfolder where a run marks what it compiled (``mark_compiled``)."""


def compiled_mark(config: Config, what: str) -> Path:
    """The mark of ``what`` ("unet" or "decoder") compiled for ``config``'s model, mode and
    scope with this torch: Inductor's cache holds kernels of that graph's kind then. Any
    file in the cache folder would not say so (another model's, the decoder's, another
    torch's kernels): a short run would then pay the cold compile it was spared."""
    speed = config.speed
    shape = (speed.compile, speed.compile_scope) if what == "unet" else ("decoder",)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where this machine's runs go
    key = "|".join((torch.__version__, device, config.model.name, *shape))
    return compile_cache_dir() / COMPILED_MARKS / hashlib.sha1(key.encode()).hexdigest()[:16]


def mark_compiled(config: Config) -> None:
    """After an epoch that ran ``config``'s compiles: mark them (``cache_holds_kernels``)."""
    for what, compiled in (
        ("unet", config.speed.compile in INDUCTOR_MODES),
        ("decoder", config.speed.compile_decoder),
    ):
        if compiled:
            mark = compiled_mark(config, what)
            try:
                mark.parent.mkdir(parents=True, exist_ok=True)
                mark.touch()
            except OSError:  # a cache folder not ours to write: the next short run weighs anew
                return


def cache_holds_kernels(config: Config, what: str = "unet") -> bool:
    """Whether an earlier run on this machine compiled ``what`` as ``config`` would."""
    return compiled_mark(config, what).is_file()


def quickest_scope(config: Config, arch: str, gpu: Gpu, scope_held: bool) -> str:
    """The ``speed.compile_scope`` whose cold compile and the run's UNet time after it are
    predicted least on ``gpu``: the scope set where it was chosen (``scope_held``) or the
    mode compiles only whole, else the whole UNet or its blocks."""
    if scope_held or config.speed.compile not in BLOCK_COMPILE_MODES:
        return config.speed.compile_scope
    return min(COMPILE_SCOPES, key=lambda scope: compiled_run(config, scope, arch, gpu))


def compiled_run(config: Config, scope: str, arch: str, gpu: Gpu) -> float:
    """Seconds of a cold compile by ``scope`` and of the run's UNet work after it."""
    trial = copy.deepcopy(config)
    trial.speed.compile_scope = scope
    eager, saved = run_saving(trial, arch, gpu)
    return eager - saved + cold_compile_seconds(trial)


def scope_line(config: Config, scope: str, arch: str, gpu: Gpu) -> str:
    """Why ``scope`` replaces ``config``'s compile scope: the first compiles, and the run's
    UNet work with each predicted."""
    old = config.speed.compile_scope
    return (
        f"speed.compile_scope {old} -> {scope} (a first compile of "
        f"~{format_duration(COLD_COMPILE_SECONDS[scope])} against "
        f"~{format_duration(COLD_COMPILE_SECONDS[old])}: with it the run's UNet work "
        f"~{format_duration(compiled_run(config, scope, arch, gpu))} against "
        f"~{format_duration(compiled_run(config, old, arch, gpu))}, time model; "
        f"--set speed.compile_scope={old} keeps it)"
    )
