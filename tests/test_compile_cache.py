"""The compile cache keeps a checkpointed training graph (``speed/compile_cache.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch._prims import rng_prims

from lowvram_ddpo.memory.checkpointing import attention_keeping_checkpoint, torch_checkpoint
from lowvram_ddpo.memory.fp8_weights import store_weights_in_fp8
from lowvram_ddpo.speed.compile import compile_unet
from lowvram_ddpo.speed.compile_cache import (
    AUTOCAST_SWITCHES,
    GRAPH_SAFE_RNG,
    MARKED_CACHEABLE,
    cache_lookups,
    cache_lookups_line,
    graph_safe_rng_is_cacheable,
    keep_training_graph_cacheable,
)
from lowvram_ddpo.speed.half_norms import run_norms_in_half


@pytest.fixture
def graph_safe_rng_as_torch_sets_it():
    """The partitioner's RNG setting at torch's default, put back after the test (a
    config module's own patch: monkeypatch's undo would delete the setting)."""
    with functorch_config.patch({GRAPH_SAFE_RNG: True}):
        yield


@pytest.fixture
def uncacheable_graph_safe_rng(monkeypatch, graph_safe_rng_as_torch_sets_it):
    """This torch as torch 2.11 is: the graph-safe RNG wrapper not cacheable."""
    monkeypatch.setattr(rng_prims.graphsafe_run_with_rng_state, "_cacheable", False)
    assert not graph_safe_rng_is_cacheable()


def test_graph_free_compiles_carry_rng_state_with_the_cacheable_wrapper(
    uncacheable_graph_safe_rng,
):
    """Where torch would not cache the graph-safe wrapper, a compile that replays no CUDA
    graph has the partitioner use the cacheable one; a compile that replays graphs gets
    the graph-safe one back (one process may compile both, the tests do)."""
    assert keep_training_graph_cacheable(replays_graphs=False)
    assert getattr(functorch_config, GRAPH_SAFE_RNG) is False
    assert not keep_training_graph_cacheable(replays_graphs=True)
    assert getattr(functorch_config, GRAPH_SAFE_RNG) is True


def test_a_torch_that_caches_the_graph_safe_wrapper_is_left_as_it_is(
    monkeypatch, graph_safe_rng_as_torch_sets_it
):
    monkeypatch.setattr(rng_prims.graphsafe_run_with_rng_state, "_cacheable", True)
    assert not keep_training_graph_cacheable(replays_graphs=False)
    assert getattr(functorch_config, GRAPH_SAFE_RNG) is True


def test_the_presets_compile_mode_turns_the_graph_safe_wrapper_off(
    fresh_dynamo, uncacheable_graph_safe_rng, tmp_path, monkeypatch
):
    """Inductor's ``default`` mode (the SD 1.5 presets') replays no graph: its compile
    sets the cacheable wrapper before anything is traced."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    compile_unet(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
    assert getattr(functorch_config, GRAPH_SAFE_RNG) is False


class CheckpointedAttention(torch.nn.Module):
    """Attention inside a gradient-checkpointed region, as the trainer's UNet has it: the
    backward recomputes ``scaled_dot_product_attention``, an op tagged random, unless
    ``checkpoint`` keeps self-attention (``memory.keep_attention``)."""

    def __init__(self, checkpoint: Callable = torch_checkpoint) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checkpoint(self.attend, x)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def training_call_lines(
    runs: int, heard: list[str], checkpoint: Callable = torch_checkpoint
) -> None:
    """``runs`` runs' first training call of a fresh module, dynamo emptied between runs
    (the disk cache kept), each compile's line into ``heard``."""
    for _ in range(runs):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = CheckpointedAttention(checkpoint)
        compile_unet(module, "default", torch.device("cpu"), say=heard.append)
        module(torch.randn(2, 5, 8)).sum().backward()


def test_a_checkpointed_training_graph_the_cache_cannot_take_is_said(
    fresh_dynamo, graph_safe_rng_as_torch_sets_it, tmp_path, monkeypatch
):
    """The CPU's RNG wrappers made uncacheable, as the graph-safe one is on CUDA under
    torch 2.11: the checkpointed attention's training graph (forward and backward) is then
    compiled by every run, and its line says so. Cacheable again, the second run's
    training call comes from the cache: the path the fix gives CUDA."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "bypassed"))
    for wrapper in (rng_prims.run_and_save_rng_state, rng_prims.run_with_rng_state):
        monkeypatch.setattr(wrapper, "_cacheable", False)
    bypassed: list[str] = []
    training_call_lines(2, bypassed)
    assert all("2 graphs the compile cache could not take" in line for line in bypassed), bypassed
    assert not any("from the compile cache" in line for line in bypassed)

    monkeypatch.undo()  # the wrappers cacheable again, a fresh cache folder
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cached"))
    cached: list[str] = []
    training_call_lines(2, cached)
    assert "; 0 of 2 graphs from the compile cache" in cached[0], cached
    assert "; 2 of 2 graphs from the compile cache" in cached[1], cached
    assert not any("could not take" in line for line in cached)


def test_a_training_graph_that_keeps_self_attention_comes_whole_from_the_cache(
    fresh_dynamo, tmp_path, monkeypatch
):
    """``memory.keep_attention``'s selective checkpoint: AOT autograd's cache takes a
    graph holding it only where its ``context_fn`` has a ``cache_hash`` and pickles; the
    second run's training call then comes from that cache (no tracing, no partitioning)
    and its kernels from Inductor's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    heard: list[str] = []
    before = cache_lookups()
    training_call_lines(2, heard, attention_keeping_checkpoint)
    looked_up = {k: n - before[k] for k, n in cache_lookups().items()}
    assert looked_up == {
        "inductor_hits": 2, "inductor_misses": 2, "inductor_bypassed": 0,
        "aot_autograd_hits": 1, "aot_autograd_misses": 1, "aot_autograd_bypassed": 0,
    }  # fmt: skip
    assert "; 2 of 2 graphs from the compile cache" in heard[1], heard
    assert cache_lookups_line(looked_up) == (
        "  compile cache, graphs: Inductor 2 hit, 2 missed, 0 bypassed; "
        "AOT autograd 1 hit, 1 missed, 0 bypassed"
    )
    assert cache_lookups_line(dict.fromkeys(looked_up, 0)) == ""


def test_the_kept_attention_policy_pickles_alike_in_every_process():
    """The cache key pickles the selective checkpoint's policy: a set of op names pickled
    in an order salted per process, and the second run's training graph missed the cache
    (a key of its own every run). Processes with other string-hash salts must agree."""
    probe = (
        "import hashlib, pickle\n"
        "from lowvram_ddpo.memory.checkpointing import KEEP_SELF_ATTENTION as k\n"
        "print(hashlib.sha256(pickle.dumps(k)).hexdigest(), k.cache_hash)"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(seen) == 1, seen


class Fp8Block(torch.nn.Module):
    """A frozen layer stored in fp8 (``memory.quantize=fp8``: a custom autograd Function
    per call) after a trainable one: its input needs a gradient, so dynamo keeps the
    Function whole in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8).requires_grad_(False)
        self.trained = torch.nn.Linear(8, 8)
        assert store_weights_in_fp8(self) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.trained(x))


def test_a_training_graph_through_an_fp8_base_comes_from_the_cache(
    fresh_dynamo, tmp_path, monkeypatch
):
    """The fp8 base's layers are a custom autograd Function, which AOT autograd's cache
    refuses by default: allowed, the second run's training call is a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    before = cache_lookups()
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = Fp8Block()
        compile_unet(block, "default", torch.device("cpu"), say=lambda line: None)
        block(torch.randn(3, 8)).sum().backward()
    looked_up = {k: n - before[k] for k, n in cache_lookups().items()}
    assert looked_up["aot_autograd_bypassed"] == 0, looked_up
    assert looked_up["aot_autograd_hits"] == 1, looked_up


def test_a_training_graph_with_half_norms_comes_from_the_cache(fresh_dynamo, tmp_path, monkeypatch):
    """``speed.half_norms`` switches autocast off around each norm: dynamo records the
    switch as torch.amp's private functions, which AOT autograd's cache refused until
    marked (``allow_autocast_switches``): the second run's training call is a hit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(inductor_config, MARKED_CACHEABLE, {})  # as torch starts
    before = cache_lookups()
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        assert run_norms_in_half(block) == 1
        compile_unet(block, "default", torch.device("cpu"), say=lambda line: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(torch.randn(3, 8))
        assert out.dtype == torch.bfloat16  # the norm ran in autocast's dtype
        out.float().sum().backward()
    looked_up = {k: n - before[k] for k, n in cache_lookups().items()}
    assert looked_up["aot_autograd_bypassed"] == 0, looked_up
    assert looked_up["aot_autograd_hits"] == 1, looked_up
    assert set(AUTOCAST_SWITCHES) <= set(getattr(inductor_config, MARKED_CACHEABLE))
