"""``speed.compile``: ``torch.compile`` of the UNet, in place.

Every UNet call of an eager run is bound by the host launching hundreds of small kernels
(measured on an H100: a LoRA forward+backward at micro-batch 1 took 164 ms where the
GPU's arithmetic needs ~4 ms). Inductor fuses those kernels (default mode: 164 -> 118 ms
per training micro-step, 171 s to compile, on the H100); ``reduce-overhead`` also
replays them as CUDA graphs. The cost is compile time at the first call of each shape
(sampling, training, grid), so it pays on long runs only: the SD 1.5 DDPO/RWR presets
compile with ``default`` (on an H100, 2026-11-26: the epoch 1.84x eager's, fp16 replay
7.0e-6 against the clip range 1e-4, 290 s of compiling), and a training run too short
to pay a cold compile runs eagerly (``speed.compile_payoff``).

``cudagraphs`` is the launch-overhead fix without Inductor: dynamo traces the UNet (and
AOT autograd its backward) and each trace is recorded once as a CUDA graph and replayed,
with the UNet's own kernels: no Triton (Windows), no kernel generation (a trace costs
seconds to a minute per shape instead of minutes), the same arithmetic as eager. On an
H200 (SD 1.5, 2026-11-26) its fp16 replay was bit-exact and training at micro-batch 4
ran 1.88x faster; on an H100 the RLCM preset's epoch 2.0x. The SD 1.5-shaped RLCM
presets turn it on; elsewhere it stays off until timed with gradient checkpointing.

Inductor's modes round half-precision results where eager does
(``inductor_options``): otherwise the sampling and training graphs round differently
and DDPO's replay is far from exact (on the CPU in bf16: ~50 times the clip range).

``nn.Module.compile`` compiles in place: parameter names, LoRA export and checkpoints
are the same as without it. Compiled code is cached on disk between runs
(``TORCHINDUCTOR_CACHE_DIR``, by default under the user's cache folder), so a resumed or
repeated run skips most of the compile time (``compile_cache``: where it lives, and what
keeps a checkpointed training graph in it on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters
from torch._inductor import list_mode_options

from lowvram_ddpo.config import BLOCK_COMPILE_MODES, COMPILE_MODES, INDUCTOR_MODES, SpeedConfig
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.reporting.progress import format_duration, word_while_waiting
from lowvram_ddpo.speed.compile_cache import (
    cache_lookups,
    compile_cache_dir,
    keep_training_graph_cacheable,
    use_compile_cache,
)
from lowvram_ddpo.speed.compile_regions import compile_regions
from lowvram_ddpo.speed.cuda_graphs import (
    count_graph_events,
    make_graph_safe,
    replays_cuda_graphs,
)
from lowvram_ddpo.speed.cudagraphs_backend import cudagraphs_compiler

RECOMPILE_LIMIT = 32


def has_triton() -> bool:
    """Whether Inductor can generate kernels for this machine's GPU: Triton installed and a
    card it supports (compute capability 7.0 or newer: no GTX 10-series)."""
    from torch.utils._triton import has_triton as torch_has_triton

    return torch_has_triton()


def inductor_gpu_missing() -> str:
    """What this machine lacks for Inductor to compile GPU kernels ("" when nothing):
    Triton and a card it supports, and on Linux what Triton builds its kernel launcher
    with at the first compile: a C compiler (``$CC``, gcc or clang) and Python's C headers
    (a container or a system Python without build tools lacks them; the run would fail
    after loading, minutes in). triton-windows brings its own compiler."""
    if not has_triton():
        return (
            "Triton (`pip install triton`; on Windows `pip install triton-windows`; cards "
            "older than the RTX 20 series have none)"
        )
    if sys.platform == "win32":
        return ""
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "a C compiler for Triton's kernel launcher (`apt install gcc`, or set CC)"
    headers = python_headers()
    if not headers.is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return (
            f"Python's C headers for Triton's kernel launcher ({headers}: "
            f"`apt install python{version}-dev`, or a Python from python.org, conda or uv)"
        )
    return ""


def python_headers() -> Path:
    """Where Triton looks for ``Python.h`` (its ``runtime/build.py``: Debian's
    ``posix_local`` scheme read as ``posix_prefix``)."""
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def inductor_missing(device: torch.device) -> str:
    """What Inductor lacks to compile for ``device`` ("" when nothing): Triton (and what it
    builds with) for GPU kernels, a C++ compiler for CPU ones."""
    if device.type == "cuda":
        return inductor_gpu_missing()
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++", "cl")):
        return "a C++ compiler (g++ or clang) on a CPU-only machine"
    return ""


def check_compiler(device: torch.device) -> None:
    """One line when Inductor cannot compile ``speed.compile``'s kernels for ``device``."""
    if missing := inductor_missing(device):
        instead = "cudagraphs (no Triton) or off" if device.type == "cuda" else "off"
        raise UserError(f"speed.compile needs {missing}; or set speed.compile={instead}")


def backend_of(mode: str) -> str:
    """The torch.compile backend of a ``speed.compile`` mode."""
    return "cudagraphs" if mode == "cudagraphs" else "inductor"


def check_compile_mode(mode: str, device: torch.device, backend: str | None = None) -> None:
    """One line if ``mode`` cannot run on ``device``: the trainer asks before loading."""
    if mode == "off":
        return
    if mode not in COMPILE_MODES:
        raise UserError(f"speed.compile must be one of {', '.join(COMPILE_MODES)} (got {mode!r})")
    if mode == "cudagraphs" and device.type != "cuda":
        raise UserError(
            "speed.compile=cudagraphs needs a CUDA GPU (it replays the UNet as CUDA graphs); "
            "on this device use speed.compile=default or off"
        )
    if (backend or backend_of(mode)) == "inductor":
        check_compiler(device)


EAGER_ROUNDINGS = "emulate_precision_casts"
"""Inductor's setting that rounds each fused operation's result to fp16/bf16 where eager
PyTorch does (``torch._inductor.config``; torch >= 2.5)."""


def inductor_options(
    mode: str, eager_roundings: bool = True, channels_last: bool = False
) -> dict[str, object]:
    """Inductor's options for ``mode`` (what ``torch.compile(mode=...)`` would set), with
    half-precision results rounded where eager rounds them (``eager_roundings``), and
    every graph's activations in channels-last layout (``channels_last``,
    ``FORCED_LAYOUT``).

    Without it Inductor keeps a fused chain's intermediates in float32 and rounds once,
    and the sampling call's inference graph and the training call's forward graph fuse
    (and so round) differently. Measured on the CPU in bf16 (2026-11-26, the pocket
    model, 10 steps, ``benchmarks/replay_error.py --compile default --cpu-autocast bf16
    [--fused-roundings] --seed N``): with Inductor's own roundings the replayed log-probs
    missed the sampled ones by 0.005 rms, ~50 times DDPO's clip range, every action
    clipped; with eager's, by 0.0 for every seed tried (docs/benchmarks.md has the rows
    and one unseeded run that missed). A diffusers attention block shows it alone
    (``tests/test_speed.py``). The rounding is a cast in registers inside each fused
    kernel, no extra memory traffic; in torch 2.13 the setting also turns off Triton's
    fused multiply-adds and takes PyTorch's libdevice (eager's numerics again). On an H100
    in fp16 (2026-11-26, SD 1.5, micro-batch 8 with checkpointing) the run's replay was
    7.0e-6 rms, 0.07 of the clip range, with the epoch 1.84x eager's. It changes the
    pointwise roundings only: reductions and kernel choices may still differ between the
    two graphs (``max-autotune`` picks matmul kernels per
    graph: measure its replay before training with it). A run measures its own replay
    (``epoch_metrics``)."""
    options: dict[str, object] = dict(list_mode_options(mode))
    if eager_roundings and hasattr(inductor_config, EAGER_ROUNDINGS):
        options[EAGER_ROUNDINGS] = True
    if channels_last and hasattr(inductor_config, FORCED_LAYOUT):
        options[FORCED_LAYOUT] = True
    return options


FORCED_LAYOUT = "force_layout_optimization"
"""Inductor's setting that lays every graph with convolutions out channels-last, past its
own heuristic. That heuristic keeps any *training* graph with a convolution of twice as
many input channels as output (SD's up blocks, after the skip connection: 2560 -> 1280)
in NCHW, so cuDNN turns each convolution's input to NHWC and its output back (0.61 s of
an epoch's 9.61 s of kernels, H100, 2026-11-27). With ``speed.channels_last`` (its frozen
convolution weights already channels-last: no copy per call) the compiled calls keep the
layout from end to end. Values unchanged; the kernels chosen may differ (the replay
measures it)."""


def compile_unet(
    unet: torch.nn.Module,
    mode: str,
    device: torch.device,
    backend: str | None = None,
    eager_roundings: bool = True,
    say: Callable[[str], None] = print,
    scope: str = "model",
    channels_last: bool = False,
) -> str:
    """Compile ``unet`` in place with ``mode`` (one of ``COMPILE_MODES``); returns a line
    for the log ("" when off). ``backend``, when given, replaces the mode's own (tests run
    the graph capture on the CPU with it). ``eager_roundings`` off (a benchmark's
    control only) lets Inductor round as it fuses (``inductor_options``);
    ``channels_last`` (``speed.channels_last``) has Inductor lay every graph out
    channels-last (``FORCED_LAYOUT``). ``scope``
    "blocks" compiles the repeated blocks one by one (``compile_regions``). Should a
    compile fail, the UNet runs eagerly from then on and ``say`` hears why
    (``eager_if_compiling_fails``); each call that compiles says how long it took."""
    if mode == "off":
        return ""
    if scope == "blocks" and mode not in BLOCK_COMPILE_MODES:
        raise ValueError(f"compile scope 'blocks' takes the default mode, not {mode!r}")
    backend = backend or backend_of(mode)
    check_compile_mode(mode, device, backend)
    counters["graph_break"].clear()  # split_graph_note speaks of this run's traces only
    use_compile_cache()
    compiled = compile_regions(unet) if scope == "blocks" else [unet]
    # one compiled entry per grad mode, train/eval, adapters on/off and shape: sampling,
    # training, the KL guard's base model, NFT's old policy, the grids, ... (default 8).
    # By blocks, all blocks of a class share one forward and so one list of entries (SD
    # 1.5's 22 resnets come in ~14 shapes): room for each block's entries, within
    # dynamo's cap per function (past a limit a block would quietly run eagerly)
    wanted = RECOMPILE_LIMIT if scope == "model" else max(RECOMPILE_LIMIT, 4 * len(compiled))
    raise_recompile_limit(wanted)
    # static shapes: each of the run's few shapes (sampling, training, grid) is compiled
    # once, specialised, instead of one slower dynamic-shape kernel for all of them
    inductor = backend == "inductor"
    options = inductor_options(mode, eager_roundings, channels_last) if inductor else None
    if hasattr(functorch_config, EARLY_BACKWARD):
        # Inductor's backward compiles with the forward, at the first call, where a
        # failure can still be caught (lazily, it would fail inside the first backward
        # pass); the cudagraphs backend records its backward at the first backward, as
        # torch's does (set either way: an earlier compile in this process set it)
        setattr(functorch_config, EARLY_BACKWARD, mode in INDUCTOR_MODES)
    graphs = replays_cuda_graphs(mode, backend)
    keep_training_graph_cacheable(graphs)  # the checkpointed training graph, on CUDA
    # the cudagraphs mode: torch's backend, its graphs reading the weights in place
    compiler = cudagraphs_compiler() if backend == "cudagraphs" else backend
    for module in compiled:
        module.compile(backend=compiler, options=options, dynamic=False)
    if graphs:
        make_graph_safe(unet)
        count_graph_events()  # the epochs report what the graphs' pool went through
    setting = f"speed.compile={mode}"
    what = "the UNet" if scope == "model" else "a block of the UNet"
    eager_if_compiling_fails(compiled, setting, what, "speed.compile=off", say)
    say_what_compiles(unet, setting, say, lambda: f"the UNet's {call_kind(unet)} call", CALLS)
    if backend == "cudagraphs":
        return (
            "torch.compile (cudagraphs): the first call of each shape is traced and recorded "
            "as a CUDA graph (seconds to a minute), then replayed"
        )
    rounding = ""
    if options is not None and eager_roundings and EAGER_ROUNDINGS not in options:
        rounding = (
            f"; torch {torch.__version__} cannot round as eager does: sampling and training "
            "may round apart (watch the epoch line's replay, or update torch)"
        )
    what = f"{len(compiled)} blocks, each shape once" if scope == "blocks" else "the UNet"
    return (
        f"torch.compile ({mode}, {what}): the first call of each shape compiles (minutes on "
        f"a GPU, less when cached in {compile_cache_dir()}){rounding}"
    )


RECOMPILE_LIMITS = (
    ("recompile_limit", "accumulated_recompile_limit"),
    ("cache_size_limit", "accumulated_cache_size_limit"),  # their names before torch 2.7
)


def raise_recompile_limit(wanted: int) -> None:
    """Let dynamo compile ``wanted`` entries per function (within its cap on all of them),
    by the settings' names this torch has."""
    for limit, cap in RECOMPILE_LIMITS:
        if hasattr(dynamo_config, limit) and hasattr(dynamo_config, cap):
            wanted = min(wanted, getattr(dynamo_config, cap))
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), wanted))
            return


EARLY_BACKWARD = "force_non_lazy_backward_lowering"
"""AOT autograd's setting that compiles a training graph's backward with its forward
(``torch._functorch.config``; by default the backward compiles at the first backward)."""


def eager_if_compiling_fails(
    modules: list[torch.nn.Module],
    setting: str,
    what: str,
    skip: str,
    say: Callable[[str], None],
) -> None:
    """From the first call whose compile fails (Triton or a compiler missing a piece, a
    bug of the compiler on some card), that compiled module (``what``: the UNet, one of
    its blocks, the VAE's decoder) runs eagerly for the rest of the run, and ``say`` hears
    one line for the run, which starts with the ``setting`` ("speed.compile=default") and
    names the one that ``skip``s the attempt ("speed.compile=off"):
    slower, not a crash minutes into a run. Only the failing module turns eager, there and
    then: the blocks that did compile keep their code, so a checkpointed block recomputes
    in its backward what its forward ran. Only compile failures
    (``BackendCompilerFailed``): any other error of a call is raised as it is, and so is
    the card running out of memory while compiling (dynamo wraps it as a compile failure:
    the trainer's own out-of-memory advice is what helps, not an eager run)."""
    said: list[str] = []

    def fall_back(module: torch.nn.Module, failure: BackendCompilerFailed) -> None:
        if isinstance(failure.inner_exception, torch.cuda.OutOfMemoryError):
            raise failure.inner_exception
        module._compiled_call_impl = None  # nn.Module calls its eager forward from now on
        if said:
            return
        cause = str(failure.inner_exception).strip().splitlines() or [""]
        said.append(cause[0])
        say(
            f"{setting}: compiling {what} failed "
            f"({type(failure.inner_exception).__name__}: {cause[0][:160]}); it runs "
            f"eagerly from here (--set {skip} skips the attempt)"
            + (MIXED_EPOCH_NOTE if torch.is_grad_enabled() else "")
            + ". Please report the line"
        )

    for module in modules:
        compiled: Callable = module._compiled_call_impl  # what nn.Module.compile installs

        def call(
            *args: object,
            _compiled: Callable = compiled,
            _module: torch.nn.Module = module,
            **kwargs: object,
        ) -> object:
            try:
                return _compiled(*args, **kwargs)
            except BackendCompilerFailed as failure:
                fall_back(_module, failure)
                return _module(*args, **kwargs)

        module._compiled_call_impl = call


MIXED_EPOCH_NOTE = (
    "; this epoch's samples were drawn by the compiled calls, so DDPO's importance ratios "
    "set them against eager kernels' roundings (the epoch line's replay says how far off 1); "
    "eager training needs more memory than Inductor's (~1.7x without checkpointing): if the "
    "card runs out, resume with --set memory.gradient_checkpointing=true"
)
"""Added where a training call's compile fails (gradients on): the epoch's log-probs came
from the compiled sampling call, so DDPO's replay is no longer like for like until the
next epoch samples eagerly too; and the fit counted Inductor's smaller training memory
(``calibration.INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING``), which eager does not hold to."""


STILL_COMPILING_AFTER = (60.0, 60.0)
"""Seconds before the first "still compiling" line of a call kind's first call, and
between the next ones: a UNet call that has not returned after a minute is compiling."""


def say_what_compiles(
    module: torch.nn.Module,
    setting: str,
    say: Callable[[str], None],
    call_name: Callable[[], str],
    calls: str,
) -> None:
    """Each call of the compiled ``module`` that compiles (the first of each shape and
    grad mode) says so in one line: which call (``call_name()``: "the UNet's training
    call"), its seconds, what the compile cache gave (``CompileCounts``); the first call
    of each name, which may compile for minutes, says every minute that it still does.
    The first call that hits dynamo's recompile limit says so too: past it dynamo runs
    that code eagerly without a word but a log warning, and a run (or a benchmark row)
    would be slower for no visible reason. ``setting`` ("speed.compile=default") starts
    each line; ``calls`` ("the UNet's calls") is what the limit's line says turned eager."""
    inner: Callable = module._compiled_call_impl or module._call_impl
    limit_said: list[bool] = []
    returned: set[str] = set()  # the calls whose first call is over

    def still_compiling(name: str) -> Callable[[float], str]:
        return lambda seconds: (
            f"{setting}: still compiling {name} "
            f"({format_duration(seconds)} so far; only a run's first calls compile)"
        )

    def call(*args: object, **kwargs: object) -> object:
        name = call_name()
        before = CompileCounts.now()
        first, every = STILL_COMPILING_AFTER
        with (
            word_while_waiting(say, still_compiling(name), first, every)
            if name not in returned
            else contextlib.nullcontext()
        ):
            out = inner(*args, **kwargs)
        returned.add(name)
        after = CompileCounts.now()
        if after.graphs > before.graphs:
            say(before.compiled_line(setting, name))
        if after.limit_hits > before.limit_hits and not limit_said:
            limit_said.append(True)
            say(
                f"{setting}: dynamo's recompile limit was reached: {calls} of new shapes "
                "or modes now run partly eagerly (slower). Please report the line"
            )
        return out

    module._compiled_call_impl = call


LIMIT_HIT = "Dynamo recompile limit exceeded"
"""How dynamo's counters name a frame left eager at its recompile limit (torch 2.13)."""


@dataclass(frozen=True)
class CompileCounts:
    """Dynamo's and Inductor's counters at one moment: a call that compiled is told
    apart by the graphs it added, and the compile cache's share by its hits and the graphs
    it could not take (a run compiling for minutes says how long, and whether the cache
    served it or ever will: ``compile_cache``)."""

    graphs: int
    cache_hits: int
    cache_misses: int
    cache_bypasses: int
    limit_hits: int
    started: float

    @classmethod
    def now(cls) -> CompileCounts:
        lookups = cache_lookups()
        return cls(
            graphs=counters["stats"]["unique_graphs"],
            cache_hits=lookups["inductor_hits"],
            cache_misses=lookups["inductor_misses"],
            cache_bypasses=lookups["inductor_bypassed"],
            limit_hits=sum(
                n for why, n in counters["unimplemented"].items() if why.startswith(LIMIT_HIT)
            ),
            started=time.perf_counter(),
        )

    def compiled_line(self, setting: str, call: str) -> str:
        """The line for a ``call`` ("the UNet's training call") that compiled since these
        counts were taken, under ``setting`` ("speed.compile=default")."""
        after = CompileCounts.now()
        hits = after.cache_hits - self.cache_hits
        looked_up = hits + after.cache_misses - self.cache_misses
        bypassed = after.cache_bypasses - self.cache_bypasses
        cache = f"; {hits} of {looked_up} graphs from the compile cache" if looked_up else ""
        if bypassed:
            cache += (
                f"; {bypassed} graph{'s' * (bypassed > 1)} the compile cache could not "
                "take (compiled again by every run)"
            )
        return f"{setting}: {call} compiled in {after.started - self.started:.0f} s{cache}"


CAN_RUN_EAGERLY = hasattr(torch.compiler, "set_stance")
"""torch >= 2.6 can run a compiled module eagerly for a while (``set_stance``); older
versions compile every call."""


@contextlib.contextmanager
def uncompiled_calls(mode: str) -> Iterator[None]:
    """Inside the block a compiled UNet runs eagerly (``torch.compiler.set_stance``): for
    one-off calls whose new shapes would cost a compile, or under CUDA graphs a memory
    pool kept for the rest of the run. Nothing changes before the block is entered."""
    if mode == "off" or not CAN_RUN_EAGERLY:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def split_graph_note(mode: str) -> str:
    """One line when dynamo traced the UNet in pieces so far ("" when it did not, or when
    ``mode`` is off). A piece per layer is slow under CUDA graphs: layers of one shape
    share a graph that is recorded again for each layer's weights, every call (measured
    on an H100 with torch 2.11, 2026-11-26: an epoch not done in 220 s against 20 eager)."""
    breaks = counters["graph_break"]
    if mode == "off" or not breaks:
        return ""
    reason = next(iter(breaks)).strip().splitlines()[0][:160]
    return (
        f"speed.compile={mode}: torch {torch.__version__} traced the UNet in pieces "
        f"(graph breaks: {sum(breaks.values())}; the first: {reason}). If epochs are not "
        "faster than with speed.compile=off, turn it off, and please report the line"
    )


CALL_KINDS = ("sampling", "training")
"""The trainer's UNet calls whose compiled form ``speed`` settings decide."""


def call_kind(unet: torch.nn.Module) -> str:
    """Which of ``CALL_KINDS`` a call of ``unet`` is: the trainer trains in train mode."""
    return "training" if unet.training else "sampling"


CALLS = "the UNet's calls"
"""What the recompile limit's line says turned eager (``say_what_compiles``)."""


def graphs_replay(speed: SpeedConfig, call: str) -> bool:
    """Whether the trainer's ``call`` ("sampling" or "training") replays CUDA graphs:
    training under every CUDA-graph mode; sampling with ``speed.graph_sampling``, and
    always under Inductor's graph modes (their fused kernels pay where graphs do not)."""
    if call not in CALL_KINDS:
        raise ValueError(f"no such UNet call: {call!r}")
    backend = backend_of(speed.compile)
    if not replays_cuda_graphs(speed.compile, backend):
        return False
    if call == "training":
        return True
    return speed.graph_sampling or backend == "inductor" or not CAN_RUN_EAGERLY


def sampling_calls(speed: SpeedConfig) -> AbstractContextManager:
    """How the sampling call runs: compiled, except under ``cudagraphs`` without
    ``speed.graph_sampling``, where it runs eagerly (see that setting)."""
    if graphs_replay(speed, "training") and not graphs_replay(speed, "sampling"):
        return uncompiled_calls(speed.compile)
    return contextlib.nullcontext()
