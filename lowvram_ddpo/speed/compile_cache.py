"""Inductor's compile cache: where it lives, and keeping the training graph in it.

A compiled UNet costs minutes at a run's first calls (SD 1.5 on an H100: 68 s for the
sampling call, 144 s for the training call); the cache on disk lets the next run (a
resume, a second preset, the next benchmark row) load the kernels instead.

**A checkpointed training graph was never cached on a CUDA GPU** (torch 2.11, H100,
2026-11-27: the training call's compile line looked up no graph at all, while the
sampling call's did). Inside a gradient-checkpointed region the partitioner recomputes
attention in the backward, and because ``scaled_dot_product_attention`` is tagged as a
random op (it may apply dropout) it wraps each recomputed call in a higher-order op that
carries the RNG state from the forward to the backward. On CUDA that op is
``graphsafe_run_with_rng_state`` (safe inside CUDA graphs), which torch 2.11 declares
uncacheable (read in its source; 2.13's marks it cacheable, after pytorch/pytorch#185562):
Inductor's FX graph cache and AOT autograd's cache both bypass the whole graph, so every
run compiled the training call from scratch. On the CPU the partitioner uses
``run_and_save_rng_state`` / ``run_with_rng_state``, cacheable in both (the pocket
model's warm-up fell from 151 s to 15 s on the CPU), which is why the CPU never showed it.

Where no CUDA graph is replayed (Inductor's ``default`` mode: the presets' mode) the
graph-safe variant buys nothing, so ``keep_training_graph_cacheable`` has the partitioner
use the plain pair on CUDA too (``torch._functorch.config.graphsafe_rng_functionalization``
off). The same kernels and numbers are expected (read from the source, not measured on
a GPU): the attention runs with dropout 0, and the plain pair only saves and restores the
generator's seed and offset on the host around the recomputed call. Under CUDA graphs
(``reduce-overhead``, ``max-autotune``, ``cudagraphs``) the graph-safe op is needed and
stays, uncached on such a torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._prims import rng_prims

GRAPH_SAFE_RNG = "graphsafe_rng_functionalization"
"""The partitioner's setting (``torch._functorch.config``) that picks the CUDA-graph-safe
RNG wrapper for random ops recomputed under activation checkpointing."""
CUSTOM_FUNCTIONS = "autograd_cache_allow_custom_autograd_functions"
"""AOT autograd's setting that lets its cache take a graph holding a custom
``torch.autograd.Function``: off by default in torch 2.11 and 2.13."""


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept: ``TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``$XDG_CACHE_HOME/lowvram-ddpo/torch-compile`` (``~/.cache/...``), which survives
    a reboot, unlike PyTorch's default under /tmp. PyTorch writes its default into the
    variable as its compiler modules load (importing ``torch._dynamo.utils`` does), so a
    value equal to that default counts as unset."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and chosen != _torch_default_cache_dir():
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowvram-ddpo" / "torch-compile"


def _torch_default_cache_dir() -> str:
    """PyTorch's own default for ``TORCHINDUCTOR_CACHE_DIR`` ("" where this torch keeps
    it elsewhere)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return ""
    return os.path.abspath(default_cache_dir())


def graph_safe_rng_is_cacheable() -> bool:
    """Whether this torch's compile caches take a graph holding the CUDA-graph-safe RNG
    wrapper (True where the wrapper does not exist: nothing to bypass)."""
    wrapper = getattr(rng_prims, "graphsafe_run_with_rng_state", None)
    return wrapper is None or wrapper.cacheable()


def use_compile_cache() -> None:
    """Before any compile of this toolkit's (the UNet's, the VAE decoder's): compiled code
    kept in ``compile_cache_dir``, and the caches' settings that decide their keys set
    alike for every compile (``allow_custom_autograd_functions``,
    ``allow_autocast_switches``): a decoder compiled in a run whose UNet is eager then
    keys as one compiled beside a compiled UNet, and a later run finds it."""
    # Inductor reads the variable at each compile: set, not setdefault (PyTorch has
    # already written its /tmp default there)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    allow_custom_autograd_functions()
    allow_autocast_switches()


def keep_training_graph_cacheable(replays_graphs: bool) -> bool:
    """Before a UNet's compile, after ``use_compile_cache``: where its calls replay no
    CUDA graph (``replays_graphs`` False), attention recomputed under checkpointing made
    to carry its RNG state with the cacheable wrapper instead of the graph-safe one, where
    this torch would not cache the latter;
    with graphs, the graph-safe one (torch's default) is set back. Returns whether the
    cacheable wrapper is in use where torch's default would not cache.

    The settings are process-wide and read when a graph is first traced, not here: a
    process that compiles two modules in different modes before calling either traces
    both with the second's (the trainer compiles one UNet, once)."""
    if graph_safe_rng_is_cacheable() or not hasattr(functorch_config, GRAPH_SAFE_RNG):
        return False
    # set on every compile, not once: one process may compile a graph mode after this
    setattr(functorch_config, GRAPH_SAFE_RNG, replays_graphs)
    return not replays_graphs


def allow_custom_autograd_functions() -> None:
    """Let AOT autograd's cache take training graphs holding a custom autograd Function:
    the fp8 base's layers are one (``memory/fp8_weights.py``), and without this each run
    traced and partitioned its training graph again (the tests' tiny SD 1.5 on the CPU
    with ``memory.quantize=fp8``: warm-up 121.5 s cold, 40.8 s warm, the training call
    34 s and "1 of 2" graphs from the cache). Dynamo traces the Function's forward and
    backward into the graph the key holds; torch's developers found that higher-order op
    pure in its inputs and keep the setting off only while they test it
    (pytorch/pytorch#149751)."""
    if hasattr(functorch_config, CUSTOM_FUNCTIONS):
        setattr(functorch_config, CUSTOM_FUNCTIONS, True)


AUTOCAST_SWITCHES = (
    "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast",
)
"""What dynamo records in a graph for a ``torch.autocast`` block inside it."""


def allow_autocast_switches() -> None:
    """Let AOT autograd's cache take training graphs that switch autocast inside them.
    ``speed.half_norms`` runs each norm with autocast off (``speed/half_norms.py``), which
    dynamo records as calls of torch.amp's private ``_enter_autocast``/``_exit_autocast``;
    AOT autograd's cache takes only public or allow-listed functions, so it bypassed
    every such graph (sampling's too) and each run traced and partitioned them again
    (pytorch/pytorch#191106). Measured on the CPU (2026-11-27, the tests' tiny SD 1.5,
    ``benchmarks/replay_error.py --compile default --cpu-autocast bf16 --half-norms
    --steps 4``, run twice on one cache): the warm run took 28.6 s with both graphs
    bypassed (training call 12 s, sampling 9 s), 15.2 s with both from the cache (3 s,
    6 s), replay 0.0 either way. Each switch's
    arguments (device, dtype, on or off) are constants of the graph that the key holds,
    so equal keys switch alike. Inductor's list for this (``unsafe_marked_cacheable_
    functions``, name -> version) is part of its own key: graphs cached before it are
    compiled once more."""
    marked = getattr(inductor_config, MARKED_CACHEABLE, None)
    if isinstance(marked, dict):
        for name in AUTOCAST_SWITCHES:
            marked.setdefault(name, torch.__version__)


MARKED_CACHEABLE = "unsafe_marked_cacheable_functions"
"""Inductor's setting that lists functions its caches (and AOT autograd's) may take."""


def cache_lookups() -> dict[str, int]:
    """This process's compile-cache lookups so far: Inductor's (a graph's kernels) and AOT
    autograd's (a training graph's trace and partition, which also names its kernels),
    hits, misses and graphs bypassed (never cached: each run compiles them again). AOT
    autograd may count one graph twice: a miss at its lookup, then a bypass when its
    entry cannot be saved."""
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {
        "inductor_hits": inductor["fxgraph_cache_hit"],
        "inductor_misses": inductor["fxgraph_cache_miss"],
        "inductor_bypassed": inductor["fxgraph_cache_bypass"],
        "aot_autograd_hits": aot["autograd_cache_hit"],
        "aot_autograd_misses": aot["autograd_cache_miss"],
        "aot_autograd_bypassed": aot["autograd_cache_bypass"],
    }


def cache_lookups_line(lookups: dict[str, int]) -> str:
    """One line of ``cache_lookups`` ("" where nothing was looked up: nothing compiled)."""
    if not any(lookups.values()):
        return ""
    parts = [
        f"{name} {lookups[f'{key}_hits']} hit, {lookups[f'{key}_misses']} missed, "
        f"{lookups[f'{key}_bypassed']} bypassed"
        for key, name in (("inductor", "Inductor"), ("aot_autograd", "AOT autograd"))
    ]
    return "  compile cache, graphs: " + "; ".join(parts)
