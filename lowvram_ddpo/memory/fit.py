"""`--vram 8GB`: choose the fastest settings that fit a card, from the estimates.

Every combination of sampling batch (its halvings, and up to 4x it where the epoch
predicted is 5% shorter per doubling: an LCM's few latents per call leave a fast card
idle), training micro-batch (up to the sampling batch: bigger is almost free on a
launch-bound GPU), gradient checkpointing (of every resolution level, or of all but the
lowest ones: ``memory.uncheckpointed_levels``), VAE tiling,
offloading (the text encoder and VAE kept on the card when they fit: no moves per batch)
decode batch (widened last, below the peak) and scoring batch, with and without the CUDA
graphs a preset sets (their pool is the first thing a small card lacks; not yet with
checkpointing; kept only where 2% faster), is ranked by the predicted
epoch time (``speed.time_model``), and the fastest whose estimated peak fits is taken:
on a fast card, micro-batch 4 with checkpointing beats micro-batch 1 without. For
algorithms that clip an importance ratio, training at the sampling batch (the same
kernels: an exact replay) is worth up to 5% of the epoch (``EXACT_REPLAY_WORTH``). Only
when none fits do the text encoders move to the CPU (slow only while new prompts
arrive), and last come a quantised frozen base, fp8 before nf4 (each changes the base
model's numbers; fp8 less, and without bitsandbytes). The
images per epoch and per optimiser step never change: a smaller batch means more
batches, or more accumulation steps. ``--vram auto`` fits what the machine's own CUDA
card has free.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from lowvram_ddpo.config import BITSANDBYTES_QUANTIZE, COMPILE_MODES, INDUCTOR_MODES, Config
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.calibration import CUDA_CONTEXT_BYTES, a_card
from lowvram_ddpo.memory.checkpointing import most_uncheckpointed_levels, resolution_levels
from lowvram_ddpo.memory.estimate import MetaRun, estimate_memory, meta_run, readable_shape
from lowvram_ddpo.memory.report import MemoryReport
from lowvram_ddpo.memory.units import (
    GB,
    format_size,
    means_as_written,
    means_this_card,
    parse_size,
)
from lowvram_ddpo.models import VAE_TILE_PIXELS
from lowvram_ddpo.optimizers import bitsandbytes_usable
from lowvram_ddpo.preflight import rescores_at_other_shapes
from lowvram_ddpo.processes import world_size
from lowvram_ddpo.reporting.progress import format_duration
from lowvram_ddpo.speed.compile import graphs_replay, inductor_gpu_missing
from lowvram_ddpo.speed.compile_payoff import (
    cold_compile_ahead,
    cold_compile_seconds,
    quickest_scope,
    scope_line,
    unpaid_compile,
    unpaid_decoder_compile,
)
from lowvram_ddpo.speed.cuda_graphs import GRAPH_MODES
from lowvram_ddpo.speed.flops import EpochFlops, epoch_flops
from lowvram_ddpo.speed.time_model import Gpu, leaf_modules, predict_epoch, this_gpu

RLCM_BASES = ("sd15", "sdxl")
"""The architectures whose runs an rlcm-* preset can stand in for: DDPM models of SD 1.5's
and SDXL's shape ("sd15-lcm" is an LCM already; the flow models have no LCM preset)."""


@dataclass
class Fit:
    config: Config
    report: MemoryReport
    changes: list[str]
    epoch_seconds: float
    """Predicted UNet time of one epoch (``speed.time_model``)."""
    gpu: Gpu

    held: frozenset[str] = frozenset()

    def summary(self, vram: str) -> str:
        changed = "; ".join(self.changes) if self.changes else "the settings as given"
        if self.held:
            changed += f" (kept as set: {', '.join(sorted(self.held))})"
        return (
            f"--vram {vram}: {changed}; predicted peak {format_size(self.report.peak_bytes)} "
            f"reserved + ~{format_size(CUDA_CONTEXT_BYTES)} CUDA context ({self.report.method}), "
            f"~{format_duration(self.epoch_seconds)} per epoch on {self.gpu.name} (time model"
            f"{self.run_length()})"
            + "".join(f"; {note}" for note in [*self.report.notes, self.long_run_hint()] if note)
        )

    def long_run_hint(self) -> str:
        """What shortens a run predicted to take days ("" for a shorter one): its work
        scales with the epochs, the denoising steps and the trained share of them; an LCM
        preset's 8 steps for a run of SD 1.5 or SDXL's shape (the rlcm-* presets' bases)
        that is not an LCM's already."""
        if self.config.run.epochs * self.epoch_seconds < LONG_RUN_SECONDS:
            return ""
        rlcm = self.report.arch in RLCM_BASES and self.config.sample.sampler != "lcm"
        lcm = " (or an rlcm-* preset: 8 steps)" if rlcm else ""
        return (
            "days of training on this card: fewer epochs (run.epochs), denoising steps "
            f"(sample.num_steps) or trained steps (train.timestep_fraction) shorten it{lcm}"
        )

    def run_length(self) -> str:
        """ "; the run's 100 epochs: ~8 h 20 min" (epochs times the predicted epoch), with
        the first compile where Inductor compiles with an empty cache ("" for a one-epoch
        run without it): a hobbyist's first run waits that long before its first image."""
        epochs = self.config.run.epochs
        pieces = []
        if epochs > 1:
            pieces.append(
                f"the run's {epochs} epochs: ~{format_duration(epochs * self.epoch_seconds)}"
            )
        if cold_compile_ahead(self.config):
            seconds = format_duration(cold_compile_seconds(self.config))
            pieces.append(f"after ~{seconds} or more of compiling (once: cached)")
        return "; " + ", ".join(pieces) if pieces else ""


def _halvings(value: int, total: int) -> list[int]:
    """value, value/2, ..., 1, keeping only divisors of ``total``."""
    options, v = [], value
    while v >= 1:
        if total % v == 0:
            options.append(v)
        v //= 2
    return options or [1]


LONG_RUN_SECONDS = 2 * 24 * 3600
"""A predicted run beyond this gets ``Fit.long_run_hint``: the paper's 50-step DDPO on a
consumer card takes days (an RTX 4060: ~9.6 days predicted)."""

SAMPLING_BATCH_GROWTH = 4
"""How far a fit may raise the sampling batch above the one written (two doublings). A
call of few latents (an LCM's 4 unguided ones) leaves a fast card waiting on the host's
launches, or with CUDA graphs on its per-kernel floor; a bigger sampling batch also lets
training take a bigger micro-batch and still replay exactly."""
BIGGER_BATCH_MARGIN = 0.05
"""What each doubling of the sampling batch above the one written must save of the epoch
(predicted) to be taken: more memory for a gain inside the time model's error is not."""
GRAPHS_MARGIN = 0.02
"""What a preset's CUDA graphs must save of the epoch (predicted) to be kept: on a card
whose calls are bound by arithmetic they save nothing, and their pool (GiBs) and first
epoch's recording cost something."""
KEPT_ATTENTION_MARGIN = 0.01
"""What keeping self-attention's outputs (``memory.keep_attention``) must save of the epoch
(predicted) to be taken: where the host's launches bound the training call it saves
nothing, and its memory must not be spent for nothing; its gain is not yet measured."""


def sampling_batches(config: Config, growth: int = SAMPLING_BATCH_GROWTH) -> list[int]:
    """Sampling batches to try, largest first: up to ``growth`` times the one written,
    then it and its halvings, each dividing the epoch's samples (the last is the smallest:
    the fit's "nothing fits" names its need). Not bigger with Flow-GRPO-Fast's window,
    drawn once per sampling batch: fewer batches would draw fewer windows."""
    s = config.sample
    samples = s.batch_size * s.batches_per_epoch
    doublings = (growth if s.sde_window == 0 else 1).bit_length() - 1
    bigger = [s.batch_size * 2**k for k in range(doublings, 0, -1)]
    return [b for b in bigger if samples % b == 0] + _halvings(s.batch_size, samples)


def micro_batches(config: Config, largest: int | None = None) -> list[int]:
    """Training micro-batches to try, largest first: the set one, and powers of two up to
    ``largest`` (default: the sampling batch; a bigger micro-batch is almost free on a
    launch-bound GPU) that divide an optimiser step's samples."""
    s, t = config.sample, config.train
    per_step = t.batch_size * t.gradient_accumulation_steps
    largest = largest or max(t.batch_size, s.batch_size)
    powers = [2**i for i in range(largest.bit_length()) if 2**i <= largest]
    return sorted({t.batch_size, *(b for b in powers if per_step % b == 0)}, reverse=True)


def candidates(
    config: Config,
    quantize: str,
    text_on_cpu: bool,
    growth: int = SAMPLING_BATCH_GROWTH,
    levels: int = 0,
    inductor: bool = True,
    attention: bool = False,
) -> Iterator[Config]:
    """Every combination of the levers, in a fixed order (the tie-break of equal times);
    sampling batches up to ``growth`` times the one written; checkpointing of all but up
    to ``levels`` - 1 of the UNet's resolution levels (0: a model without levels), and
    with self-attention's outputs kept where that saves arithmetic (``attention``);
    Inductor in place of dropped CUDA graphs where it can run (``inductor``)."""
    s, t = config.sample, config.train
    samples = s.batch_size * s.batches_per_epoch
    per_step = t.batch_size * t.gradient_accumulation_steps
    # (checkpointing, levels kept out of it, attention kept): the fewer kept, the less memory
    keeping = [True, False] if attention else [config.memory.keep_attention]
    checkpointing = [
        (True, kept, keep)
        for kept in range(most_uncheckpointed_levels(levels), -1, -1)
        for keep in keeping
    ]
    if not config.memory.gradient_checkpointing:
        checkpointing.insert(0, (False, 0, False))
    # the text encoder and the VAE stay on the card when they fit (no moves per batch);
    # both are tried whatever was set: offloading changes no number (a resumed run that
    # kept them on a bigger card can offload them on a smaller one)
    offloading = [False, True]
    # tiles only exist above their size; a few more decode passes cost less than recomputing
    # the UNet in every backward, so tiling comes before checkpointing
    tiles = s.resolution > VAE_TILE_PIXELS and not config.memory.vae_tiling
    tiling = [False, True] if tiles else [config.memory.vae_tiling]
    scoring = _halvings(config.reward.batch_size, config.reward.batch_size)
    # CUDA graphs as set, then without them: their pool is what a small card lacks first
    compiling = [config.speed.compile]
    if config.speed.compile in GRAPH_MODES:
        compiling.append(without_graphs(config.speed.compile, inductor))
    batches = sampling_batches(config, growth)
    micros = micro_batches(config, largest=max(batches))
    levers = itertools.product(compiling, checkpointing, tiling, offloading)
    for compile_mode, (ckpt, kept, keep), tiled, offload in levers:
        if keep and compile_mode not in INDUCTOR_MODES and not config.memory.keep_attention:
            # not offered eager: its policy runs in Python for every op of every
            # checkpointed block (forward and recomputation), a host cost the time model
            # does not know (compiled, it is traced away)
            continue
        if compile_mode in GRAPH_MODES and ckpt and not config.memory.gradient_checkpointing:
            # not paired by the fit: on an H100 (torch 2.11, 2026-11-26) the pair split
            # dynamo's graph at every attention layer; fixed, it was still slow (a second
            # epoch not done in 105 s against ~20 eager; cause not known)
            continue
        for micro in micros:
            # a smaller scoring batch (reward models) costs the least: it is tried first
            for batch, scored in itertools.product(batches, scoring):
                if micro > max(t.batch_size, batch):  # up to the sampling batch, as written
                    continue
                trial = copy.deepcopy(config)
                trial.speed.compile = compile_mode
                trial.memory.gradient_checkpointing = ckpt
                trial.memory.uncheckpointed_levels = kept
                trial.memory.keep_attention = keep
                trial.memory.vae_tiling = tiled
                trial.memory.offload = offload
                trial.memory.quantize = quantize
                trial.memory.text_encoders_on_cpu = text_on_cpu
                trial.train.batch_size = micro
                trial.train.gradient_accumulation_steps = per_step // micro
                trial.sample.batch_size = batch
                trial.sample.batches_per_epoch = samples // batch
                trial.reward.batch_size = scored
                yield trial


def without_graphs(mode: str, inductor: bool = True) -> str:
    """A compile mode less its CUDA graphs: Inductor's fused kernels (``default``) where
    it was one of Inductor's graph modes, or where ``inductor`` can run (plain
    ``cudagraphs`` replays eager kernels: its fallback need not be eager, and Inductor's
    replayed SD 1.5's UNet within 0.07 of DDPO's clip range on an H100), else eager."""
    return "default" if mode in INDUCTOR_MODES or inductor else "off"


FITTED_FIELDS = (
    "sample.batch_size",
    "sample.batches_per_epoch",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "reward.batch_size",
    "memory.gradient_checkpointing",
    "memory.uncheckpointed_levels",
    "memory.keep_attention",
    "memory.offload",
    "memory.vae_tiling",
    "memory.text_encoders_on_cpu",
    "memory.quantize",
    "memory.decode_batch",
    "speed.compile",
    "speed.compile_scope",
)
"""What a fit may change (``speed.compile`` only from a CUDA-graph mode to Inductor
without graphs, or eager: ``without_graphs``; ``speed.compile_scope`` only where a cold
compile is weighed: ``compile_where_it_pays``)."""
_PAIRS = (
    ("sample.batch_size", "sample.batches_per_epoch"),
    ("train.batch_size", "train.gradient_accumulation_steps"),
    ("memory.gradient_checkpointing", "memory.uncheckpointed_levels"),
)
"""Fields held together: the images per epoch and per optimiser step stay, and
checkpointing set by hand is kept as written (every level, unless levels are set too)."""
_HELD_WITH = {
    "memory.gradient_checkpointing": "memory.keep_attention",
    "memory.uncheckpointed_levels": "memory.keep_attention",
}
"""Held along with a field, not the other way round: checkpointing set by hand keeps no
attention unless that is set too, while ``keep_attention=false`` alone leaves the fit
free to checkpoint."""


def _value(config: Config, field_name: str) -> object:
    section, name = field_name.split(".")
    return getattr(getattr(config, section), name)


WEIGHED_FIELDS = ("speed.compile_decoder",)
"""Settings the search leaves alone but a run may drop before it (a preset's compiled
decoder where it cannot run or would not pay: ``decoder_compile_where_it_pays``): held,
like the fitted ones, when the user sets them."""


def held_fields(assignments: list[str]) -> frozenset[str]:
    """The fitted (and weighed) fields that ``--set`` assignments name (with their pairs):
    a fit keeps what the user chose and fits the rest around it."""
    named = {a.split("=", 1)[0].strip() for a in assignments}
    named &= set(FITTED_FIELDS) | set(WEIGHED_FIELDS)
    paired = {f for pair in _PAIRS if named & set(pair) for f in pair}
    along = {_HELD_WITH[f] for f in named | paired if f in _HELD_WITH}
    return frozenset(named | paired | along)


def describe_changes(before: Config, after: Config) -> list[str]:
    changes = []
    for name in FITTED_FIELDS:
        old, new = _value(before, name), _value(after, name)
        if old != new:
            changes.append(f"{name} {old} -> {new}")
    return changes


def vram_budget(vram: str) -> int:
    """Bytes of a ``--vram`` value: a card size ("8GB"), or "auto": what this machine's
    CUDA card has free now, plus the CUDA context this process already holds there (the
    fit takes the context off again), so a desktop's share of the card stays out."""
    if not means_this_card(vram):
        return parse_size(vram)
    if not torch.cuda.is_available():
        raise UserError(
            "--vram auto reads the size of this machine's CUDA GPU, and there is none: "
            "give the card's size instead, like --vram 8GB"
        )
    if world_size() > 1:  # each process would fit its own card
        raise UserError(
            "--vram auto fits one GPU; a multi-GPU run needs the same settings on every "
            "card: give the smallest card's size, like --vram 24GB"
        )
    free, _total = torch.cuda.mem_get_info()
    return free + CUDA_CONTEXT_BYTES


def vram_label(vram: str, budget: int) -> str:
    """How a fit names its budget: "8GB", or "auto (7.21 GB free on NVIDIA ...)"."""
    if not means_this_card(vram):
        return vram
    free = format_size(budget - CUDA_CONTEXT_BYTES)
    return f"auto ({free} free on {torch.cuda.get_device_name()})"  # only after vram_budget


def fit_to_vram(
    config: Config,
    arch: str,
    vram_bytes: int,
    held: frozenset[str] = frozenset(),
    growth: int = SAMPLING_BATCH_GROWTH,
    inductor: bool = True,
) -> Fit:
    """The fastest candidate whose estimated peak fits ``vram_bytes`` minus the CUDA context,
    with the ``held`` fields as ``config`` has them; text encoders on the CPU, then an fp8
    base, then a 4-bit one, only when nothing else fits. ``inductor``: whether Inductor may
    replace CUDA graphs that do not fit or do not pay (false where the run's machine lacks
    what it needs; an estimate for another machine's card assumes it has it)."""
    budget = vram_bytes - CUDA_CONTEXT_BYTES
    run = meta_run(config, arch)
    given = config
    if "memory.decode_batch" not in held:  # one at a time first; widened once a fit is found
        config = copy.deepcopy(config)
        config.memory.decode_batch = 1
    flops = epoch_flops(config, arch, count_backward=False)
    timing = EpochTiming(flops, this_gpu(), leaf_modules(run.parts.unet), config.sample.batch_size)
    quantizations = quantisation_levels(config, held)
    levels = len(resolution_levels(run.parts.unet))
    # kept only where it saves arithmetic (levels counted) and PyTorch's kernels run
    # (xformers' are not the policy's)
    attention = flops.recomputation.self_attention[0] > 0 and config.memory.attention == "sdpa"
    # text encoders on the CPU cost time only while new prompts arrive: before a
    # quantised base
    on_cpu = [True] if config.memory.text_encoders_on_cpu else [False, True]
    smallest_settings = [config]  # each level's last: every lever of the level on
    for quantize, text_on_cpu in itertools.product(quantizations, on_cpu):
        trains = TrainingBudget(arch, run, budget)
        every = [
            trial
            for trial in candidates(
                config, quantize, text_on_cpu, growth, levels, inductor, attention
            )
            if all(_value(trial, name) == _value(config, name) for name in held)
        ]
        if not every:  # a held quantisation or text-encoder placement
            continue
        smallest_settings.append(every[-1])
        for trial in sorted(every, key=timing.rank):
            if not trains.fits(trial):
                continue
            report = estimate_memory(trial, arch, run)
            if report.peak_bytes <= budget:
                if "memory.decode_batch" not in held:
                    trial, report = widest_decode(trial, arch, run, report)
                changes = describe_changes(given, trial)
                seconds = timing.seconds(trial)
                return Fit(trial, report, changes, seconds, timing.gpu, held)
    # the levels' smallest: not always the last (SD 1.5's decode is larger on nf4 than fp8)
    smallest = min(estimate_memory(c, arch, run).peak_bytes for c in smallest_settings)
    kept = keeping_as_set(held)
    nf4 = (
        ", install bitsandbytes (pip install 'lowvram-ddpo[bnb]': an nf4 base is smaller)"
        if _no_bitsandbytes_here() and "memory.quantize" not in held and config.model.lora_rank
        else ""
    )
    raise UserError(
        f"nothing fits in {format_size(vram_bytes)}{kept}: the smallest setting needs "
        f"{format_size(smallest + CUDA_CONTEXT_BYTES)} with the CUDA context. "
        f"Lower sample.resolution{', set fewer fields' if held else ''}{nf4}, or use a "
        "bigger card"
    )


def quantisation_levels(config: Config, held: frozenset[str] = frozenset()) -> list[str]:
    """The bases a fit tries, in order: as set, then (where the user set none) fp8, closer
    to the base than nf4 and without bitsandbytes, then nf4. On a CUDA machine without
    bitsandbytes its kinds are left out, and a preset's own becomes fp8: what would fail
    to load is not offered (a CPU-only machine estimates for a GPU user: all are kept)."""
    kinds = [config.memory.quantize]
    if config.memory.quantize == "none" and config.model.lora_rank > 0:
        kinds += ["fp8", "nf4"]
    if _no_bitsandbytes_here() and "memory.quantize" not in held:
        kinds = list(dict.fromkeys("fp8" if k in BITSANDBYTES_QUANTIZE else k for k in kinds))
    return kinds


def _no_bitsandbytes_here() -> bool:
    return torch.cuda.is_available() and not bitsandbytes_usable()


DECODE_HEADROOM = GB // 4
"""What a widened decode leaves below the run's peak: the decoded images held on the
card until the batch is copied back, and the estimate's error on a phase not yet
measured on a GPU."""


def widest_decode(
    config: Config, arch: str, run: MetaRun, report: MemoryReport
) -> tuple[Config, MemoryReport]:
    """``config`` decoding as many images per VAE call (powers of two, then the whole
    sampling batch) as keep the decode phase ``DECODE_HEADROOM`` below the peak
    ``report`` estimates: fewer, larger decode calls for no memory. The decode's working
    memory grows with its batch (SD 1.5 at 512 px: ~0.9 GiB an image, calibrated), so the
    widest that fits is the last before one that does not."""
    s = config.sample
    widths = [2**i for i in range(1, s.batch_size.bit_length()) if 2**i < s.batch_size]
    best = (config, report)
    for width in [w for w in (*widths, s.batch_size) if w > config.memory.decode_batch]:
        trial = copy.deepcopy(config)
        trial.memory.decode_batch = width
        wider = estimate_memory(trial, arch, run)
        if wider.phase("decode").peak_reserved + DECODE_HEADROOM > report.peak_bytes:
            break
        best = (trial, wider)
    return best


AUTO_MARGIN_BYTES = GB // 2
"""What ``auto`` leaves free of what the card has: the estimate's error (1-5% of the
allocated bytes on the H100's rows), and what other programs take while the run starts."""


def fit_for_run(
    config: Config,
    arch: str,
    held: frozenset[str] = frozenset(),
    asked: bool = True,
    say: Callable[[str], None] = lambda line: None,
    resumed: bool = False,
    runs_here: bool = True,
    inductor: bool = True,
) -> tuple[Config, str]:
    """The settings a run or a benchmark uses, and the line that says so: ``config``'s own
    where ``memory.vram`` is empty or "off", else the fit to its card (``arch``: an
    architecture, or a model whose configs to read, else its default architecture). A
    preset's "auto" (not ``asked`` for on the command line) without CUDA, or in a
    multi-GPU run, keeps the settings as written instead of refusing, less a preset's CUDA
    graphs without CUDA. A preset's compile mode where this machine cannot run it (or it
    was never run: several GPUs) is off first, fitted or not (``compile_where_it_runs``),
    unless the settings do not run here (``runs_here`` false: an estimate for another
    machine's card). ``say`` hears
    that a fit starts (it estimates a dozen settings or more: seconds). A ``resumed`` run's
    sampling batch, fitted before, may shrink but not grow again, and its base keeps its
    precision. ``inductor`` false: the fit may not take Inductor in place of CUDA graphs."""
    eager = ""
    if runs_here:
        config, eager = compile_where_it_runs(config, held)
    inductor = inductor and (not runs_here or inductor_runs_here())
    fitted, line = _fitted_or_as_written(config, arch, held, asked, say, resumed, inductor)
    return fitted, "\n".join(part for part in (eager, line) if part)


def inductor_runs_here() -> bool:
    """Whether this machine can compile the UNet with Inductor for its CUDA card: a fit
    may then take Inductor's kernels where a preset's CUDA graphs do not fit."""
    return torch.cuda.is_available() and not inductor_gpu_missing()


def compile_where_it_runs(config: Config, held: frozenset[str]) -> tuple[Config, str]:
    """``config`` less a preset's compiles (the UNet's ``speed.compile``, the VAE decoder's
    ``speed.compile_decoder``) where this machine cannot run them or they were never run,
    and the lines that say so ("" when kept)."""
    config, unet = unet_compile_where_it_runs(config, held)
    missing = decoder_compile_missing()
    config, decoder = (
        without_preset_decoder_compile(config, held, missing) if missing else (config, "")
    )
    return config, "\n".join(part for part in (unet, decoder) if part)


def decoder_compile_missing() -> str:
    """Why the VAE's decoder cannot be compiled here for a GPU run ("" where it can)."""
    if world_size() > 1:
        return "not yet run on several GPUs"
    if not torch.cuda.is_available():
        return "compiled for a CUDA GPU"
    missing = inductor_gpu_missing()
    return f"this machine lacks {missing}: the VAE decodes eagerly" if missing else ""


def without_preset_decoder_compile(
    config: Config, held: frozenset[str], why: str
) -> tuple[Config, str]:
    """``config`` less a preset's ``speed.compile_decoder``, with the line that says why;
    one the user set is kept (it compiles, or fails with its own line)."""
    if not config.speed.compile_decoder or "speed.compile_decoder" in held:
        return config, ""
    kept = copy.deepcopy(config)
    kept.speed.compile_decoder = False
    return kept, f"speed.compile_decoder true -> false ({why})"


def unet_compile_where_it_runs(config: Config, held: frozenset[str]) -> tuple[Config, str]:
    """``config`` less a preset's ``speed.compile`` where this machine cannot run it or it
    was never run, and the line that says so ("" when kept): every mode in a multi-GPU
    run; Inductor's without CUDA, or without what Triton needs. A preset's CUDA graphs
    without CUDA go only under its own "auto" (``_fitted_or_as_written``): as written, or
    fitted to a size, they fail with their own line in a run."""
    if world_size() > 1:
        return without_preset_compile(config, held, "", "not yet run on several GPUs")
    if not torch.cuda.is_available():
        return without_preset_compile(config, held, "", "compiled for a CUDA GPU", INDUCTOR_MODES)
    missing = inductor_gpu_missing()
    return without_preset_compile(
        config, held, "", runs_eagerly(missing), INDUCTOR_MODES if missing else ()
    )


def compile_where_it_pays(config: Config, held: frozenset[str]) -> tuple[Config, str]:
    """``config`` compiling by the scope whose cold compile and run are predicted quickest
    (the UNet's blocks for a shorter run, unless the scope was set), less a preset's
    Inductor mode where even that saves less than the compile costs
    (``speed.compile_payoff``), and the line that says so ("" when kept as it is). For a
    training run only: a benchmark compiles to measure."""
    if "speed.compile" in held or not cold_compile_ahead(config):
        return config, ""
    arch, _ = readable_shape(config, config.model.name)
    gpu = this_gpu()
    scope = quickest_scope(config, arch, gpu, "speed.compile_scope" in held)
    scoped = copy.deepcopy(config)
    scoped.speed.compile_scope = scope
    why = unpaid_compile(scoped, arch, gpu)
    if why:
        return without_preset_compile(config, held, "", why, INDUCTOR_MODES)
    if scope == config.speed.compile_scope:
        return config, ""
    return scoped, scope_line(config, scope, arch, gpu)


def fit_new_run(
    config: Config, held: frozenset[str], asked: bool, say: Callable[[str], None]
) -> tuple[Config, str]:
    """A new training run's settings and lines: its decoder's compile weighed
    (``decoder_compile_where_it_pays``), fitted (``fit_for_run``), then its UNet's compile
    weighed (``compile_where_it_pays``). Where the fit took Inductor in place of a preset's
    plain CUDA graphs and the run is too short to pay Inductor's first compile, it is
    fitted again without Inductor: the graphs where they fit and pay, else eager (not
    eager at the batches chosen for Inductor). Where the weighing changed the compile
    otherwise (eager, or by blocks), it is fitted again with that compile: Inductor's
    whole-UNet graph holds less training memory than either (``calibration``), so the
    batches fitted for it may not fit without it, and the line's epoch would be another
    setting's."""
    config, decoder = decoder_compile_where_it_pays(config, held)
    fitted, line = fit_for_run(config, config.model.name, held, asked, say)
    paid, why = compile_where_it_pays(fitted, held)
    if paid.speed.compile == "off" and took_inductor_for_graphs(config, fitted):
        paid, line = fit_for_run(config, config.model.name, held, asked, say, inductor=False)
        why = (
            f"Inductor's kernels in place of speed.compile={config.speed.compile} would not "
            "pay their first compile in a run this short: fitted without them"
        )
    elif compile_of(paid) != compile_of(fitted):
        weighed = copy.deepcopy(config)
        weighed.speed.compile, weighed.speed.compile_scope = compile_of(paid)
        paid, line = fit_for_run(weighed, config.model.name, held, asked, say)
    return paid, "\n".join(part for part in (decoder, line, why) if part)


def compile_of(config: Config) -> tuple[str, str]:
    """The UNet's compile: (``speed.compile``, ``speed.compile_scope``)."""
    return config.speed.compile, config.speed.compile_scope


def decoder_compile_where_it_pays(config: Config, held: frozenset[str]) -> tuple[Config, str]:
    """``config`` less a preset's ``speed.compile_decoder`` where the run is predicted to
    save less decoding than the decoder's cold compile costs, with the line that says so.
    Weighed before the fit, which decodes wider calls with a compiled decoder (less
    working memory)."""
    if not config.speed.compile_decoder or "speed.compile_decoder" in held:
        return config, ""
    if decoder_compile_missing():  # not run here at all: compile_where_it_runs says why
        return config, ""
    arch, _ = readable_shape(config, config.model.name)
    why = unpaid_decoder_compile(config, arch, this_gpu())
    return without_preset_decoder_compile(config, held, why) if why else (config, "")


def took_inductor_for_graphs(given: Config, fitted: Config) -> bool:
    """Whether a fit replaced ``given``'s plain CUDA graphs with Inductor's kernels."""
    mode = given.speed.compile
    replaced = mode in GRAPH_MODES and mode not in INDUCTOR_MODES
    return replaced and fitted.speed.compile in INDUCTOR_MODES


def _fitted_or_as_written(
    config: Config,
    arch: str,
    held: frozenset[str],
    asked: bool,
    say: Callable[[str], None],
    resumed: bool,
    inductor: bool,
) -> tuple[Config, str]:
    """``fit_for_run``'s settings and line, once a preset's Inductor mode is settled
    (``inductor``: whether a fit may take it in place of CUDA graphs)."""
    vram = config.memory.vram
    if means_as_written(vram):
        return config, ""
    if means_this_card(vram) and not asked:
        if not torch.cuda.is_available():
            line = "memory.vram = auto: no CUDA GPU here, the settings as written"
            return without_preset_compile(config, held, line, "compiled for a CUDA GPU")
        if world_size() > 1:  # their compile mode is settled (compile_where_it_runs)
            return config, (
                "memory.vram = auto fits one GPU: the settings as written on every card "
                "(--vram SIZE fits them to the smallest)"
            )
    budget = vram_budget(vram)
    label = vram_label(vram, budget)
    if means_this_card(vram):  # all the card has free: leave room for the estimate's error
        budget -= AUTO_MARGIN_BYTES
    say(f"fitting the settings to {label} (estimating each: seconds)")
    if resumed:  # its LoRA trained on this base: no other under it
        held = held | {"memory.quantize"}
    arch, guessed = readable_shape(config, arch)
    growth = 1 if resumed else SAMPLING_BATCH_GROWTH
    fit = fit_to_vram(config, arch, budget, held, growth, inductor)
    line = fit.summary(label) + (f" (the model's shape guessed: {arch})" if guessed else "")
    hint = fp8_hint(config, arch, budget, fit, held, growth, inductor)  # not with a held base
    return fit.config, line + (f". {hint}" if hint else "")


FP8_HINT_GAIN = 1.25
"""How much faster (predicted) a fit on an fp8 base must be for the fit to mention it."""


def fp8_hint(
    config: Config,
    arch: str,
    budget: int,
    fit: Fit,
    held: frozenset[str],
    growth: int = SAMPLING_BATCH_GROWTH,
    inductor: bool = True,
) -> str:
    """What an fp8 base would give on the same card, where it is predicted at least
    ``FP8_HINT_GAIN`` times faster than ``fit`` ("" otherwise): the freed GiB often buy a
    bigger micro-batch (SDXL on 8 GB: 2 instead of 1). The fit itself never takes it
    while a 16-bit setting fits: it changes the base model's weights, the user's call."""
    if "memory.quantize" in held or fit.config.memory.quantize != "none":
        return ""
    if config.model.lora_rank == 0:
        return ""
    trial = copy.deepcopy(config)
    trial.memory.quantize = "fp8"
    try:
        faster = fit_to_vram(trial, arch, budget, held | {"memory.quantize"}, growth, inductor)
    except UserError:
        return ""
    if faster.epoch_seconds * FP8_HINT_GAIN > fit.epoch_seconds:
        return ""
    changes = "; ".join(faster.changes) or "the settings as given"
    return (
        f"With an fp8 base (--set memory.quantize=fp8: its weights rounded to 8 bits; "
        f"{changes}): ~{format_duration(faster.epoch_seconds)} per epoch predicted, "
        f"{format_size(faster.report.peak_bytes)} reserved + the CUDA context"
    )


def runs_eagerly(missing: str) -> str:
    """Why a preset's Inductor mode is off: this machine lacks ``missing``."""
    return f"this machine lacks {missing}: the UNet runs eagerly, ~1.8x slower epochs on an H100"


def without_preset_compile(
    config: Config,
    held: frozenset[str],
    line: str,
    why: str,
    modes: tuple[str, ...] = COMPILE_MODES,
) -> tuple[Config, str]:
    """``config`` less the ``speed.compile`` mode a preset sets, where that mode is one of
    ``modes`` (that cannot run here, or were never run here: no CUDA, no Triton, several
    GPUs), with ``line`` saying so. A mode the user set is kept: it fails with its own one line."""
    mode = config.speed.compile
    if mode == "off" or mode not in modes or "speed.compile" in held:
        return config, line
    kept = copy.deepcopy(config)
    kept.speed.compile = "off"
    change = f"speed.compile {mode} -> off ({why})"
    return kept, f"{line} but {change}" if line else change


@dataclass
class TrainingBudget:
    """Whether a setting's training phase fits, estimated from the smallest micro-batch up:
    memory grows with the micro-batch, so a micro-batch is only estimated once every smaller
    one (same checkpointing, offloading and sampling batch) fits. It grows with the levels
    kept out of checkpointing too, so what one answer says of the others is not estimated
    again. The fastest settings come first in the fit, and on a small card their large
    micro-batches rarely fit; each costs seconds to estimate (SDXL)."""

    arch: str
    run: MetaRun
    budget: int
    known: dict[tuple[int, float, tuple], bool] = field(default_factory=dict)
    """(micro-batch, levels holding their activations, the rest of the setting): fits."""

    def fits(self, trial: Config) -> bool:
        t, m = trial.train, trial.memory
        # checkpointing off holds every level's activations
        holding = m.uncheckpointed_levels if m.gradient_checkpointing else float("inf")
        # the sampling batch too: a graphed sampling step's pool is held while training
        rest = (
            m.offload,
            trial.sample.batch_size if graphs_replay(trial.speed, "sampling") else 0,
            trial.speed.compile,
            # the whole UNet under Inductor holds less: 0.90 checkpointed, 0.60 not
            trial.speed.compile_scope,
            # so checkpointing off is answered apart: under Inductor it need not hold more
            # than every checkpointed level count (calibration.training_working_bytes)
            m.gradient_checkpointing,
            m.gradient_checkpointing and m.keep_attention,  # holds more, not a level's worth
        )
        per_step = t.batch_size * t.gradient_accumulation_steps
        for micro in reversed(micro_batches(trial, largest=t.batch_size)):
            answer = self._known(micro, holding, rest)
            if answer is None:
                probe = copy.deepcopy(trial)
                probe.train.batch_size = micro
                probe.train.gradient_accumulation_steps = per_step // micro
                peak = estimate_memory(probe, self.arch, self.run).phase("training").peak_reserved
                answer = self.known[(micro, holding, rest)] = peak <= self.budget
            if not answer:
                return False
        return True

    def _known(self, micro: int, holding: float, rest: tuple) -> bool | None:
        """What the answers so far say: it fits where a setting holding as much or more
        fitted, not where one holding as much or less did not; None: not known."""
        for (m, held, r), fitted in self.known.items():
            if m == micro and r == rest and (held >= holding if fitted else held <= holding):
                return fitted
        return None


EXACT_REPLAY_WORTH = 0.05
"""The longer epoch the fit accepts for training at the sampling batch, where training
would otherwise re-score with other kernels (``preflight.rescores_at_other_shapes``)."""


@dataclass
class EpochTiming:
    """Predicted epoch seconds of candidate settings of one run (``speed.time_model``)."""

    flops: EpochFlops
    gpu: Gpu
    unet_modules: int
    written_batch: int
    """The sampling batch as written: raising it must pay (``BIGGER_BATCH_MARGIN``)."""

    def seconds(self, config: Config) -> float:
        return predict_epoch(config, self.flops, self.gpu, self.unet_modules).total

    def rank(self, config: Config) -> float:
        """The fit's order: seconds, with exact replay worth ``EXACT_REPLAY_WORTH`` of them,
        each doubling of the sampling batch above the one written costing
        ``BIGGER_BATCH_MARGIN``, CUDA graphs ``GRAPHS_MARGIN`` and kept attention
        ``KEPT_ATTENTION_MARGIN``."""
        drift = rescores_at_other_shapes(config)
        doublings = max(0, (config.sample.batch_size // self.written_batch).bit_length() - 1)
        replay = 1 + EXACT_REPLAY_WORTH if drift else 1
        graphs = 1 + GRAPHS_MARGIN if config.speed.compile in GRAPH_MODES else 1
        m = config.memory
        kept = 1 + KEPT_ATTENTION_MARGIN if m.gradient_checkpointing and m.keep_attention else 1
        return self.seconds(config) * replay * graphs * kept * (1 + BIGGER_BATCH_MARGIN * doublings)


HINT_CARD_SIZES_GB = (4, 6, 8, 12, 16, 24)
"""Card sizes hobbyists have, for `bench memory`'s hint."""


def smaller_card_hint(
    config: Config, arch: str, card_gb: int | None, held: frozenset[str] = frozenset()
) -> str:
    """What `--vram` picks for the next common card size below ``card_gb``, the one the
    settings need ("" when there is none smaller), keeping the ``held`` fields."""
    smaller = [size for size in HINT_CARD_SIZES_GB if size < (card_gb or 99)]
    if not smaller:
        return ""
    size = smaller[-1]
    try:
        fit = fit_to_vram(config, arch, size * GB, held)
    except UserError:
        fewer = "set fewer fields or " if held else ""
        return (
            f"on {a_card(size)} nothing fits{keeping_as_set(held)}: {fewer}lower sample.resolution"
        )
    return f"for {a_card(size)}: {fit.summary(f'{size}GB')}"


def keeping_as_set(held: frozenset[str]) -> str:
    """The fields a fit keeps as the user set them, as its lines name them ("" for none)."""
    return f" keeping {', '.join(sorted(held))} as set" if held else ""
