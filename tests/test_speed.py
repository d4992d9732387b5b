"""Speed paths change no numbers: the loop's noise, coefficients and replay are exactly
those of the step-by-step path; a compiled UNet replays its own samples with ratio one;
`bench speed` times a real run and reports MFU from counted FLOPs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import assert_replay_gives_ratio_one
from typer.testing import CliRunner

from lowvram_ddpo.cli import app
from lowvram_ddpo.config import apply_overrides, load_preset
from lowvram_ddpo.epoch_metrics import TrainingTotals
from lowvram_ddpo.models import attach_lora
from lowvram_ddpo.policy import DDIMPolicy, GaussianStep, LCMPolicy
from lowvram_ddpo.policy.base import draw_noise
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.speed.compile import compile_unet
from lowvram_ddpo.speed.compile_cache import compile_cache_dir
from lowvram_ddpo.speed.devices import dense_fp16_tflops
from lowvram_ddpo.speed.flops import epoch_flops
from lowvram_ddpo.text_encoding import encode_negative

runner = CliRunner()


def test_noise_drawn_up_front_equals_noise_drawn_per_step():
    shape = (2, 4, 8, 8)
    mean, std = torch.zeros(shape), torch.ones(2, 1, 1, 1)
    generator = torch.Generator().manual_seed(3)
    one_by_one = [GaussianStep(mean, std, mean).sample(generator) for _ in range(5)]
    up_front = draw_noise(shape, 5, torch.Generator().manual_seed(3))
    assert torch.equal(torch.stack(one_by_one), up_front)


def test_ddim_coefficient_table_equals_the_per_step_formula(tiny_pipeline):
    """The device table holds, bit for bit, what computing each step in float64 gives."""
    policy = DDIMPolicy(tiny_pipeline.scheduler.config, num_steps=10, eta=1.0)
    t = policy.timesteps()
    abar = policy.alphas_cumprod
    prev = t - policy.step_size
    abar_t = abar[t]
    final = torch.full_like(abar_t, policy.final_alpha_cumprod)
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    got = policy.step_coefficients(t)
    for value, expected in zip(got, (abar_t, abar_prev, sigma), strict=True):
        assert torch.equal(value.flatten(), expected.float())


def test_lcm_table_rejects_timesteps_outside_its_schedule(tiny_pipeline):
    """A timestep the policy never samples has no successor: NaN, never a silent wrong one."""
    policy = LCMPolicy(tiny_pipeline.scheduler.config, num_steps=4)
    rows = policy._tables.on(torch.device("cpu"))
    assert torch.isfinite(rows[policy.timesteps()]).all()
    assert torch.isnan(rows[policy.timesteps()[0] - 1, 1])


def test_the_replay_is_measured_before_the_first_update_and_reported():
    """Before an epoch's first optimiser step the policy is the one that sampled: the
    log-prob differences then measure the replay (rms and clipped share), apart from the
    policy's movement after it; the epoch line shows a miss from 1% of the clip range,
    the run warns from 10% or any clipped action."""
    from lowvram_ddpo.epoch_metrics import replay_miss, replay_warning

    totals = TrainingTotals()
    d = 3e-5  # a log-prob difference: approx_kl = d^2 / 2
    totals.add_micro_step(
        torch.tensor(1.0), {"approx_kl": torch.tensor(d * d / 2), "clipfrac": torch.tensor(0.0)}
    )
    totals.add_micro_step(
        torch.tensor(1.0), {"approx_kl": torch.tensor(d * d / 2), "clipfrac": torch.tensor(0.5)}
    )
    totals.add_optimizer_step(0.5)
    totals.add_micro_step(
        torch.tensor(1.0), {"approx_kl": torch.tensor(4.0), "clipfrac": torch.tensor(1.0)}
    )
    means = totals.means()
    assert means["replay_rms"] == pytest.approx(d, rel=1e-4)
    assert means["replay_clipfrac"] == 0.25
    assert means["approx_kl"] == 4.0 and means["clipfrac"] == 1.0  # after the update only
    config = load_preset("incompressibility")  # sampled 8, trained 1 at a time
    assert replay_miss(means, 1e-4) == "  replay 3.0e-05"
    warning = replay_warning(means, config)
    assert "0.30 of the clip range" in warning and "25.0% of those actions clipped" in warning
    assert "re-scores 1 at a time what sampling computed 8 at a time" in warning
    config.train.batch_size = 8
    assert "at equal batches (speed.compile=default)" in replay_warning(means, config)
    exact = {"replay_rms": 0.0, "replay_clipfrac": 0.0}
    assert replay_miss(exact, 1e-4) == "" and replay_warning(exact, config) == ""
    close = {"replay_rms": 5e-6, "replay_clipfrac": 0.0}  # 5% of the clip range
    assert replay_miss(close, 1e-4) and not replay_warning(close, config)
    unclipped = {"replay_rms": 1e-3, "replay_clipfrac": None}  # DDPO-SF: no clip range
    assert replay_miss(unclipped, 1e-4) == "" and replay_warning(unclipped, config) == ""
    diverged = {"replay_rms": float("nan"), "replay_clipfrac": 1.0}  # the guard's to say
    assert replay_miss(diverged, 1e-4) == "" and replay_warning(diverged, config) == ""
    assert TrainingTotals().means()["replay_rms"] is None  # RWR: no log-probs


def test_training_totals_sum_on_the_device_and_read_back_once():
    totals = TrainingTotals()
    totals.add_micro_step(torch.tensor(1.0), {"approx_kl": torch.tensor(5.0)})
    totals.add_optimizer_step(0.5)
    totals.add_micro_step(torch.tensor(3.0), {"approx_kl": torch.tensor(2.0)})
    means = totals.means()
    assert means["loss"] == 2.0 and isinstance(means["loss"], float)
    assert means["approx_kl"] == 2.0  # only after the first optimiser step
    assert means["grad_norm"] == 0.5


def assert_samples_replay_with_ratio_one(pipe) -> None:  # noqa: ANN001
    """Sample three prompts without gradients in eval mode, re-score every step with them
    in train mode (two different code paths, or compiled graphs): ratio one."""
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=3, eta=1.0)
    negative = encode_negative(pipe, "")
    pipe.unet.eval()
    samples = sample_trajectories(
        pipe, pipe.unet, policy, ["a cat", "a dog", "a fox"], negative, 5.0, 32,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    pipe.unet.train()
    with torch.enable_grad():
        assert_replay_gives_ratio_one(pipe.unet, policy, samples, negative, 5.0)


def with_active_lora(unet: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """``unet`` with a rank-2 LoRA on its attention whose B is not zero: the adapters change
    the output and gradients reach both matrices."""
    attach_lora(unet, 2, alpha, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return unet


SLOW = os.environ.get("LOWVRAM_DDPO_SLOW_TESTS") == "1"


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # the cudagraphs backend: test_graph_modes_accumulate_gradients_...
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not SLOW, reason="~2 min of C++ compilation: LOWVRAM_DDPO_SLOW_TESTS=1"
            ),
        ),
    ],
)
def test_compiled_unet_replays_its_own_samples_exactly(
    backend, tiny_pipeline, tmp_path, monkeypatch
):
    """torch.compile samples without gradients and re-scores with them in training mode:
    two different compiled graphs. The replayed log-probs must stay within 1e-5 of the
    stored ones (the PPO clip range is 1e-4), and the parameter names (what a checkpoint or
    an exported LoRA holds) must not change. CI runs the graph capture (dynamo + AOT
    autograd, ``aot_eager``); inductor's generated kernels (the users' path, ~2 min to
    compile here) run with LOWVRAM_DDPO_SLOW_TESTS=1 (passed on 2026-11-25)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    pipe = tiny_pipeline
    attach_lora(pipe.unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"])
    names = [n for n, _ in pipe.unet.named_parameters()]
    note = compile_unet(pipe.unet, "default", torch.device("cpu"), backend=backend)
    assert note.startswith("torch.compile (") and compile_cache_dir() == tmp_path / "cache"
    assert [n for n, _ in pipe.unet.named_parameters()] == names
    assert_samples_replay_with_ratio_one(pipe)
    if backend == "inductor":
        assert (tmp_path / "cache").is_dir()  # compiled code kept for the next run


def test_a_unet_compiled_by_blocks_replays_exactly_and_shares_code_between_blocks(
    fresh_dynamo, tiny_pipeline
):
    """speed.compile_scope=blocks compiles each attention layer and resnet apart (the
    outermost ones: not the transformer block inside a layer): the parameter names stay,
    the replay is exact, each compiled block's first call compiles, and blocks of one
    shape reuse one another's code (fewer graphs than blocks x the two calls)."""
    from torch._dynamo.utils import counters

    from lowvram_ddpo.speed.compile_regions import compile_regions

    pipe = tiny_pipeline
    attach_lora(pipe.unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"])
    names = [n for n, _ in pipe.unet.named_parameters()]
    regions = compile_regions(pipe.unet)
    kinds = {type(m).__name__ for m in regions}
    assert kinds == {"Transformer2DModel", "ResnetBlock2D"}, kinds
    heard: list[str] = []
    note = compile_unet(
        pipe.unet, "default", torch.device("cpu"), backend="aot_eager", say=heard.append,
        scope="blocks",
    )  # fmt: skip
    assert note.startswith(f"torch.compile (default, {len(regions)} blocks, each shape once)")
    assert all(m._compiled_call_impl is not None for m in regions)
    assert [n for n, _ in pipe.unet.named_parameters()] == names
    assert_samples_replay_with_ratio_one(pipe)
    assert [line.split("the UNet's ")[1].split(" call")[0] for line in heard] == [
        "sampling", "training"
    ]  # fmt: skip
    torch._dynamo.reset()  # compiled code forgotten, the counters kept
    before = counters["stats"]["unique_graphs"]
    pipe.unet.eval()
    with torch.no_grad():  # the sampling call alone: blocks of one shape share a graph
        pipe.unet(*_unet_inputs(pipe.unet))
    sampling_graphs = counters["stats"]["unique_graphs"] - before
    assert 0 < sampling_graphs < len(regions), (sampling_graphs, len(regions))


def _unet_inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, timesteps and text states for a call of a tiny UNet (16 px latents)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 4, 4, generator=generator)
    states = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500]), states


def test_a_block_that_fails_to_compile_runs_eagerly_inside_checkpointing(
    fresh_dynamo, tiny_pipeline
):
    """By blocks, a compile that fails for some blocks (here a backend that refuses every
    graph with a SiLU: the resnets) turns those blocks eager there and then and leaves the
    compiled attention layers compiled: under gradient checkpointing each block's
    backward recomputes what its forward ran, so the training call gives eager's output
    and LoRA gradients, and one line says it."""
    from torch._dynamo import register_backend

    from lowvram_ddpo.memory.checkpointing import enable_checkpointing
    from lowvram_ddpo.speed.compile_regions import compile_regions

    def no_silu(gm, example_inputs):  # noqa: ANN001, ANN202
        if any("silu" in str(node.target) for node in gm.graph.nodes):
            raise RuntimeError("no SiLU kernels")
        return gm.forward

    register_backend(no_silu, name="lowvram_ddpo_no_silu")
    unet = with_active_lora(tiny_pipeline.unet, 2.0)
    enable_checkpointing(unet)
    unet.train()
    eager = copy.deepcopy(unet)
    heard: list[str] = []
    compile_unet(unet, "default", torch.device("cpu"), backend="lowvram_ddpo_no_silu",
                 say=heard.append, scope="blocks")  # fmt: skip
    outputs, grads = [], []
    for model in (eager, unet):
        out = model(*_unet_inputs(model)).sample
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    for compiled_grad, eager_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
    failures = [line for line in heard if "failed" in line]
    assert len(failures) == 1 and "compiling a block of the UNet failed" in failures[0]
    regions = compile_regions(unet)
    assert all(
        (m._compiled_call_impl is None) == (type(m).__name__ == "ResnetBlock2D") for m in regions
    )


def test_compiling_by_blocks_is_checked_in_one_line(tiny_preset, tmp_path):
    """speed.compile_scope: blocks takes Inductor's default mode (the CUDA-graph modes
    replay one graph per call), a model without known blocks is refused, and the trainer
    hands the scope to the compile."""
    import lowvram_ddpo.trainer as trainer_module
    from lowvram_ddpo.config import validate
    from lowvram_ddpo.errors import UserError
    from lowvram_ddpo.speed.compile_regions import compile_regions

    config = load_preset(str(tiny_preset))
    for mode in ("reduce-overhead", "cudagraphs", "max-autotune"):
        wrong = copy.deepcopy(config)
        apply_overrides(wrong, [f"speed.compile={mode}", "speed.compile_scope=blocks"])
        with pytest.raises(UserError, match="compile_scope=blocks takes speed.compile=default"):
            validate(wrong)
    apply_overrides(wrong, ["speed.compile_scope=layers"])
    with pytest.raises(UserError, match="compile_scope must be one of model, blocks"):
        validate(wrong)
    with pytest.raises(UserError, match="no repeated blocks known in Linear"):
        compile_regions(torch.nn.Linear(2, 2))
    from tiny import build_tiny_sd3_pipeline  # SD 3's transformer declares no blocks

    transformer = build_tiny_sd3_pipeline().transformer
    assert [type(m).__name__ for m in compile_regions(transformer)] == [
        "JointTransformerBlock"
    ] * len(transformer.transformer_blocks)
    seen: dict = {}

    def spy(unet, mode, device, **kwargs):  # noqa: ANN001, ANN202
        seen.update(kwargs, mode=mode)
        return ""

    apply_overrides(config, ["run.progress=false", "speed.compile=default",
                             "speed.compile_scope=blocks"])  # fmt: skip
    original = trainer_module.compile_unet
    trainer_module.compile_unet = spy
    try:
        trainer_module.Trainer(config, tmp_path / "run").setup()
    finally:
        trainer_module.compile_unet = original
    assert seen["mode"] == "default" and seen["scope"] == "blocks"


def _attention_block_outputs(
    eager_roundings: bool, training_graph_sampling: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A diffusers transformer block (self- and cross-attention, as in SD's UNet) in bf16,
    compiled by Inductor through ``compile_unet``: its output sampled (eval, no gradients;
    or through the training graph) and in training (train mode, a trainable weight: the
    forward of a joint graph)."""
    from contextlib import nullcontext

    from diffusers.models.attention import BasicTransformerBlock

    from lowvram_ddpo.speed.training_graph_sampling import through_training_graph

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=32).to(torch.bfloat16)
    block.requires_grad_(False)
    block.attn1.to_q.weight.requires_grad_(True)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    cond = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    compile_unet(block, "default", torch.device("cpu"), eager_roundings=eager_roundings)
    sampling = through_training_graph(block) if training_graph_sampling else nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block.eval()
        with torch.no_grad(), sampling:
            sampled = block(x, encoder_hidden_states=cond)
        assert not block.training and not sampled.requires_grad  # restored, detached
        block.train()
        trained = block(x, encoder_hidden_states=cond)
    return sampled, trained.detach()


def test_inductor_rounds_sampling_and_training_alike(fresh_dynamo, tmp_path, monkeypatch):
    """Inductor compiles the sampling call and the training call into different graphs,
    which fuse, and so round, differently in half precision: on this attention block in
    bf16 their outputs differ (the control: Inductor's own roundings), and with the
    trainer's options (``inductor_options``: results rounded where eager rounds) they
    are bitwise equal, as DDPO's replay needs (the pocket model's replay: ~0.005 rms,
    ~50 times the clip range, against 0.0; docs/benchmarks.md)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    sampled, trained = _attention_block_outputs(eager_roundings=False)
    assert not torch.equal(sampled, trained)  # if a torch fixes this, drop the control
    torch._dynamo.reset()
    sampled, trained = _attention_block_outputs(eager_roundings=True)
    assert torch.equal(sampled, trained)


def test_sampling_through_the_training_graph_replays_whatever_inductor_fuses(
    fresh_dynamo, tmp_path, monkeypatch
):
    """Sampled through the training call's own compiled graph (train mode, gradients on,
    outputs detached), the attention block's output equals training's bitwise even with
    Inductor's own roundings, which make the two graphs differ otherwise (the test above)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    sampled, trained = _attention_block_outputs(eager_roundings=False, training_graph_sampling=True)
    assert torch.equal(sampled, trained)


def test_compiled_code_is_kept_where_a_reboot_leaves_it(tmp_path, monkeypatch):
    """PyTorch writes its /tmp default into TORCHINDUCTOR_CACHE_DIR as its compiler loads:
    that value counts as unset and compiling moves the cache under the user's cache
    folder; a folder the user chose is kept."""
    import torch._dynamo.utils  # noqa: F401  (writes PyTorch's default, as in a real run)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    ours = tmp_path / "xdg" / "lowvram-ddpo" / "torch-compile"
    assert compile_cache_dir() == ours
    line = compile_unet(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ours) and str(ours) in line
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    compile_unet(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "chosen")


class Small(torch.nn.Module):
    """A module of its own to compile: dynamo skips torch.nn's own frames."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu() * 2


def test_each_compiling_call_says_how_long_and_what_the_cache_gave(
    fresh_dynamo, tmp_path, monkeypatch
):
    """A call that compiles says which call, how long it took and how many of its graphs
    came from the compile cache: a GPU session cut off in a warm-up epoch still knows
    where the minutes went. A second run (dynamo's memory emptied, the disk cache kept)
    takes every graph from the cache; calls that compile nothing say nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    heard: list[str] = []
    for _ in range(2):
        torch._dynamo.reset()
        layer = Small()
        compile_unet(layer, "default", torch.device("cpu"), say=heard.append)
        layer(torch.randn(3, 4)).sum().backward()  # the training call: forward + backward
        with torch.no_grad():
            layer.eval()
            layer(torch.randn(3, 4))  # the sampling call
            layer(torch.randn(3, 4))  # compiled already: no line
    assert len(heard) == 4, heard
    assert [line.split("the UNet's ")[1].split(" call")[0] for line in heard] == [
        "training", "sampling", "training", "sampling"
    ]  # fmt: skip
    assert all(line.startswith("speed.compile=default: ") for line in heard)
    assert "; 0 of 2 graphs from the compile cache" in heard[0]  # forward and backward
    assert "; 2 of 2 graphs from the compile cache" in heard[2]
    assert "; 1 of 1 graphs from the compile cache" in heard[3]


def test_a_first_call_that_takes_minutes_says_every_minute_it_is_still_compiling(monkeypatch):
    """Inductor's compile of the UNet's first sampling and training calls takes minutes
    with nothing on the screen (233 s on an H100): each kind's first call says every
    minute that it still compiles (here every 0.05 s, the first call slowed as a compile
    is); later calls, however slow, say nothing."""
    import time

    import lowvram_ddpo.speed.compile as compile_module

    class Slow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.delays = [0.4, 0.4, 0.4]  # a compile per kind, then a slow later call

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(self.delays.pop(0) if self.delays else 0.0)
            return x

    monkeypatch.setattr(compile_module, "STILL_COMPILING_AFTER", (0.05, 0.05))
    heard: list[str] = []
    unet = Slow()
    compile_module.say_what_compiles(
        unet,
        "speed.compile=default",
        heard.append,
        lambda: f"the UNet's {compile_module.call_kind(unet)} call",
        compile_module.CALLS,
    )
    unet.eval()
    unet(torch.ones(1))  # sampling's first call
    sampling = len(heard)
    unet.train()
    unet(torch.ones(1))  # training's first
    training = len(heard) - sampling
    unet.eval()
    unet(torch.ones(1))  # sampling again, slow: not compiling, no word
    assert len(heard) == sampling + training
    assert sampling >= 3 and training >= 3  # ~8 lines each in 0.4 s
    assert heard[0].startswith("speed.compile=default: still compiling the UNet's sampling call")
    assert "training call" in heard[-1] and heard[-1].endswith("only a run's first calls compile)")


def test_a_run_past_dynamos_recompile_limit_says_so_once(fresh_dynamo):
    """Past dynamo's recompile limit a new shape runs eagerly with no more than a log
    warning: the compiled UNet's wrapper says it in one line, once, and the calls still
    compute what eager does."""
    import torch._dynamo.config as dynamo_config

    layer, heard = Small(), []
    compile_unet(layer, "default", torch.device("cpu"), backend="eager", say=heard.append)
    limit = dynamo_config.recompile_limit
    dynamo_config.recompile_limit = 1
    try:
        for rows in (2, 3, 4, 5):
            x = torch.randn(rows, 4)
            torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
    finally:
        dynamo_config.recompile_limit = limit
    limit_lines = [line for line in heard if "recompile limit was reached" in line]
    assert len(limit_lines) == 1 and limit_lines[0].startswith("speed.compile=default: ")


def test_inductor_options_are_the_modes_with_eager_roundings(tmp_path, monkeypatch):
    """Each Inductor mode's own options, plus rounding as eager does (CI's torch 2.13); a
    torch without the setting is compiled without it and its log line says the replay
    may suffer (the modules are never called here: nothing compiles)."""
    import lowvram_ddpo.speed.compile as compile_module
    from lowvram_ddpo.speed.compile import inductor_options

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))

    assert inductor_options("default") == {"emulate_precision_casts": True}  # torch 2.13
    assert inductor_options("reduce-overhead") == {
        "triton.cudagraphs": True, "emulate_precision_casts": True
    }  # fmt: skip
    unrounded = inductor_options("max-autotune", eager_roundings=False)
    assert unrounded["max_autotune"] and "emulate_precision_casts" not in unrounded
    line = compile_unet(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
    assert "cannot round" not in line
    monkeypatch.setattr(compile_module, "EAGER_ROUNDINGS", "a_setting_this_torch_lacks")
    line = compile_unet(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
    assert "cannot round as eager does" in line and "watch the epoch line's replay" in line


@pytest.mark.skipif(not SLOW, reason="~2 min of C++ compilation: LOWVRAM_DDPO_SLOW_TESTS=1")
def test_inductor_replay_in_bf16_is_exact(fresh_dynamo, tmp_path, monkeypatch):
    """The pocket model sampled and re-scored under Inductor in bf16 on the CPU (the
    stand-in for a GPU's half precision), 10 steps: the replayed log-probs equal the
    sampled ones."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from replay_error import replay_error

    result = replay_error("pocket", "default", 10, 2, cpu_autocast="bf16")
    assert result["rms_log_prob_difference"] == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graph_modes_accumulate_gradients_and_keep_outputs_as_eager(tiny_pipeline, checkpointing):
    """speed.compile's CUDA-graph modes copy gradients and outputs out of the graph pool
    (``speed/cuda_graphs.py``): on the CPU (the cudagraphs backend's capture without
    graphs) two accumulated micro-steps give eager's gradients, and an earlier call's
    output survives a later call unchanged; with the trainer's checkpointing too (the
    micro-batch-8 path within 6 GiB)."""
    from lowvram_ddpo.memory.checkpointing import enable_checkpointing

    eager = with_active_lora(tiny_pipeline.unet, 2.0)
    if checkpointing:
        enable_checkpointing(eager)
    compiled = copy.deepcopy(eager)
    compile_unet(compiled, "default", torch.device("cpu"), backend="cudagraphs")
    generator = torch.Generator().manual_seed(0)
    calls = [
        (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
         torch.randn(2, 8, 32, generator=generator))
        for _ in range(2)
    ]  # fmt: skip
    outputs = {}
    for name, unet in (("eager", eager), ("compiled", compiled)):
        outputs[name] = []
        for x, t, cond in calls:
            out = unet(x, t, encoder_hidden_states=cond).sample
            out.square().mean().backward()
            outputs[name].append(out.detach())
        first = outputs[name][0]
        assert torch.equal(first, unet(*calls[0][:2], encoder_hidden_states=calls[0][2]).sample)
    for a, b in zip(outputs["eager"], outputs["compiled"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    grads = [(n, p.grad) for n, p in eager.named_parameters() if p.requires_grad]
    trained = [p for p in compiled.parameters() if p.requires_grad]
    for (name, g), p in zip(grads, trained, strict=True):
        assert g is not None and torch.allclose(g, p.grad, atol=1e-6), name


@pytest.mark.parametrize("backend", ["ours", "torch's"])
def test_cudagraphs_backend_reads_the_weights_in_place(tiny_pipeline, monkeypatch, backend):
    """speed.compile=cudagraphs tells cudagraph trees that the UNet's weights keep their
    address (static inputs, read in place by a graph), where torch's own backend names
    none of them and so copies every weight before each replay
    (``speed/cudagraphs_backend.py``). A CPU cannot record a graph: the backends' checks
    are told it can, and a stand-in for cudagraph trees notes what each graph would take
    as static and runs the graph as it is, so outputs and gradients are eager's too."""
    import torch._dynamo.backends.cudagraphs as stock
    import torch._inductor.cudagraph_trees as trees

    from lowvram_ddpo.speed.cudagraphs_backend import cudagraphs_compiler

    graphs = []

    def stand_in(model, inputs, static_input_idxs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        copied = [tuple(x.shape) for i, x in enumerate(inputs) if i not in static_input_idxs]
        graphs.append((kwargs["is_backward"], len(static_input_idxs), copied))
        return model

    monkeypatch.setattr(stock, "check_for_skip", lambda *args: None)
    monkeypatch.setattr(stock, "get_device_index", lambda graph: 0)
    monkeypatch.setattr(trees, "cudagraphify_impl", stand_in)
    eager = with_active_lora(tiny_pipeline.unet, 2.0)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=cudagraphs_compiler() if backend == "ours" else "cudagraphs")
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500])
    cond = torch.randn(2, 8, 32, generator=generator)
    outputs = []
    for unet in (eager, compiled):
        out = unet(x, t, encoder_hidden_states=cond).sample
        out.square().mean().backward()
        outputs.append(out.detach())
    assert torch.allclose(*outputs, atol=1e-6)
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6)

    forward = [(static, copied) for is_backward, static, copied in graphs if not is_backward]
    assert len(forward) == 1 and any(is_backward for is_backward, _, _ in graphs)
    static, copied = forward[0]
    weights = len(list(compiled.parameters())) + len(list(compiled.buffers()))
    if backend == "ours":  # every weight read in place; the latents, steps and text copied
        assert static == weights > 100
        assert sorted(copied) == sorted([tuple(x.shape), tuple(t.shape), tuple(cond.shape)])
    else:  # what ours is for: should torch's ever name the weights, ours can go
        assert static == 0 and len(copied) == weights + 3


def test_cudagraphs_backend_gives_way_to_torchs_where_its_pieces_are_missing(monkeypatch):
    """Written against torch 2.11-2.13's internals: where one is gone, speed.compile=
    cudagraphs compiles with torch's own backend (copying the weights) instead of failing."""
    import torch._dynamo.backends.cudagraphs as stock

    from lowvram_ddpo.speed.cudagraphs_backend import (
        cudagraphs_compiler,
        cudagraphs_reading_weights_in_place,
    )

    assert cudagraphs_compiler() is cudagraphs_reading_weights_in_place
    monkeypatch.delattr(stock, "count_tangents")
    assert cudagraphs_compiler() == "cudagraphs"


def test_cuda_graph_recordings_are_counted_per_epoch_and_a_late_one_is_said():
    """cudagraph trees' manager methods are wrapped once (a CPU cannot record a graph:
    the real methods run on stand-ins for the manager); the counts since a snapshot are
    an epoch's metrics (the epoch line's piece), and a recording after the process's first
    epoch is one note."""
    import itertools
    from types import SimpleNamespace

    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    from lowvram_ddpo.speed.cuda_graphs import (
        GRAPH_EVENTS,
        count_graph_events,
        graph_events_piece,
        graph_events_since,
        recorded_again_note,
    )

    assert count_graph_events() and count_graph_events()  # a second call wraps nothing more
    assert not hasattr(CUDAGraphTreeManager.new_graph_id.__wrapped__, "__wrapped__")
    before = copy.copy(GRAPH_EVENTS)
    manager = SimpleNamespace(
        graph_counter=itertools.count(7),
        warmup_node_counter=itertools.count(-1, -1),
        current_node=None,
    )
    assert CUDAGraphTreeManager.new_graph_id(manager).id == 7
    assert CUDAGraphTreeManager.new_graph_id(manager).id == 8
    CUDAGraphTreeManager.new_warmup_node_id(manager)
    with pytest.raises(AssertionError):  # counted, then the real method wants a graph node
        CUDAGraphTreeManager.apply_checkpoint_execution_state_in_allocator(manager)
    events = graph_events_since(before)
    assert events == {
        "cuda_graph_recorded": 2, "cuda_graph_warmups": 1, "cuda_graph_pool_restores": 1
    }  # fmt: skip
    metrics = {"epoch": 3, **events}
    assert recorded_again_note(metrics, "cudagraphs", first_epoch=True) == ""
    note = recorded_again_note(metrics, "cudagraphs", first_epoch=False)
    assert "recorded 2 CUDA graph(s) again in epoch 3 (1 warm-up runs)" in note
    quiet = {"epoch": 3, "cuda_graph_recorded": 0}
    assert recorded_again_note(quiet, "cudagraphs", first_epoch=False) == ""
    assert graph_events_piece(metrics) == "  graphs recorded 2 (warm-ups 1)"
    assert graph_events_piece(quiet) == graph_events_piece({"epoch": 3}) == ""


def test_a_torch_whose_graph_manager_differs_counts_nothing(monkeypatch):
    """Where cudagraph trees' manager lacks the methods counted, nothing is wrapped and
    the epochs report no graph events (zeros would read as "no recording")."""
    import torch._inductor.cudagraph_trees as trees

    from lowvram_ddpo.speed.cuda_graphs import count_graph_events, graph_events_counted

    monkeypatch.setattr(trees, "CUDAGraphTreeManager", type("OtherManager", (), {}))
    assert not count_graph_events() and not graph_events_counted()


def test_bench_speed_reports_graph_events_per_epoch_when_graphs_replay(monkeypatch):
    """Where the training call replays CUDA graphs, each epoch's metrics carry the graph
    events and `bench speed` lists them per epoch (on the CPU no graph records: zeros)."""
    from lowvram_ddpo.trainer import Trainer

    monkeypatch.setattr(Trainer, "counts_graph_events", property(lambda self: True))
    result = runner.invoke(
        app,
        ["bench", "speed", "--preset", "pocket-incompressibility", "--batches", "1",
         "--set", "sample.num_steps=2", "--set", "sample.batch_size=2",
         "--set", "train.batch_size=2", "--set", "train.gradient_accumulation_steps=1",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    events = json.loads(result.stdout)["cuda_graph_events_by_epoch"]
    assert len(events) == 2 and all(e["cuda_graph_recorded"] == 0 for e in events)


def test_one_off_renders_run_eagerly_under_compile(tiny_pipeline):
    """Grids and evaluation call the compiled UNet with shapes of their own: inside
    ``uncompiled_calls`` nothing is traced (no compile, no CUDA-graph pool of its own) and
    the output is eager's; outside, a new shape is traced as before."""
    from torch._dynamo.utils import counters

    from lowvram_ddpo.speed.compile import uncompiled_calls

    unet = tiny_pipeline.unet
    generator = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 8, 32)
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        eager = unet(x, t, encoder_hidden_states=cond).sample
        compile_unet(unet, "default", torch.device("cpu"), backend="aot_eager")
        counters.clear()
        with uncompiled_calls("default"):
            rendered = unet(x, t, encoder_hidden_states=cond).sample
        assert counters["frames"]["total"] == 0 and torch.equal(rendered, eager)
        unet(x, t, encoder_hidden_states=cond)
    assert counters["frames"]["total"] >= 1


@pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 graphs every call"
)
def test_only_the_calls_that_pay_replay_cuda_graphs():
    """Under cudagraphs the training call replays graphs, the sampling call only with
    speed.graph_sampling (else it runs eagerly: no trace, no pool); Inductor's graph modes
    graph both (their fused kernels pay anyway); its default mode neither."""
    from contextlib import nullcontext

    from lowvram_ddpo.config import SpeedConfig
    from lowvram_ddpo.speed.compile import graphs_replay, sampling_calls

    cases = [
        (SpeedConfig("cudagraphs"), True, False),
        (SpeedConfig("cudagraphs", graph_sampling=True), True, True),
        (SpeedConfig("reduce-overhead"), True, True),
        (SpeedConfig("max-autotune"), True, True),
        (SpeedConfig("default", graph_sampling=True), False, False),
        (SpeedConfig("off"), False, False),
    ]
    for speed, training, sampling in cases:
        assert graphs_replay(speed, "training") is training, speed
        assert graphs_replay(speed, "sampling") is sampling, speed
        eager_sampling = training and not sampling
        assert isinstance(sampling_calls(speed), nullcontext) is not eager_sampling, speed
    with pytest.raises(ValueError, match="no such UNet call"):
        graphs_replay(SpeedConfig("cudagraphs"), "grid")
    assert load_preset("rlcm-incompressibility").speed.graph_sampling
    assert load_preset("rlcm-sdxl-aesthetic").speed.graph_sampling  # inherited
    assert not load_preset("incompressibility").speed.graph_sampling


def _kernel_ops(call) -> int:  # noqa: ANN001
    """Aten ops of ``call`` that compute (views left out): kernel launches on a GPU."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from cudagraphs_cpu_check import OpCount

    with OpCount() as counter:
        call()
    return counter.computing


def test_fused_lora_layers_compute_what_peft_computes_in_fewer_kernels(tiny_pipeline):
    """speed.fused_lora: in fp32 the fused layers give peft's outputs and LoRA gradients
    (scaling 2 here), the base model's with the adapters off, under bf16 autocast the same
    to bf16's precision, and each layer's forward launches 2 kernels fewer (the up-projection,
    the scaling and the sum: one addmm)."""
    from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers

    peft_unet = with_active_lora(tiny_pipeline.unet, 4.0)
    fused = copy.deepcopy(peft_unet)
    layers = fuse_lora_layers(fused)
    assert layers == sum(1 for m in peft_unet.modules() if hasattr(m, "lora_A")) > 0
    generator = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 8, 32)
    t = torch.tensor([10, 500])

    def run(unet, autocast=False):  # noqa: ANN001, ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return unet(x, t, encoder_hidden_states=cond).sample.float()

    outputs = {}
    for name, unet in (("peft", peft_unet), ("fused", fused)):
        out = run(unet)
        out.square().mean().backward()
        outputs[name] = out.detach()
    assert torch.allclose(outputs["peft"], outputs["fused"], atol=1e-6)
    trained = [(n, p) for n, p in fused.named_parameters() if p.requires_grad]
    reference = [p for p in peft_unet.parameters() if p.requires_grad]
    for (name, p), q in zip(trained, reference, strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    with torch.no_grad():
        low = [run(unet, autocast=True) for unet in (peft_unet, fused)]
        assert torch.allclose(*low, atol=2e-2, rtol=2e-2)
        fused.disable_adapters(), peft_unet.disable_adapters()
        assert torch.equal(run(fused), run(peft_unet))
        assert not torch.allclose(run(fused), outputs["fused"], atol=1e-3)
        fused.enable_adapters(), peft_unet.enable_adapters()
        saved = _kernel_ops(lambda: run(peft_unet)) - _kernel_ops(lambda: run(fused))
    assert saved == 2 * layers


def test_fused_lora_takes_only_plain_adapters_and_mixes_dtypes_as_peft_does():
    """The fused path takes one plain adapter; dropout, a LoRA bias, a second active
    adapter or merged weights go to peft's forward. Without autocast a bf16 base with an
    fp32 adapter gives peft's output (to bf16's precision)."""
    from peft import LoraConfig, inject_adapter_in_model

    from lowvram_ddpo.speed.lora_fusion import _fusable_adapter, fuse_lora_layers

    def layer(**options):  # noqa: ANN003, ANN202
        model = torch.nn.Sequential(torch.nn.Linear(16, 8))
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], **options)
        return inject_adapter_in_model(config, model)[0]

    assert _fusable_adapter(layer(), (), {}) == "default"
    assert _fusable_adapter(layer(lora_dropout=0.1), (), {}) is None
    assert _fusable_adapter(layer(lora_bias=True), (), {}) is None
    two = layer()
    two.update_layer("second", 2, 4, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    two.set_adapter(["default", "second"])
    assert _fusable_adapter(two, (), {}) is None
    merged = layer()
    merged.merge()
    assert _fusable_adapter(merged, (), {}) is None

    torch.manual_seed(0)
    model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
        torch.nn.Sequential(torch.nn.Linear(16, 8)),
    )
    base = model[0].base_layer
    base.to(torch.bfloat16)
    torch.nn.init.normal_(model[0].lora_B["default"].weight, std=0.5)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    expected = model(x)
    assert fuse_lora_layers(model) == 1
    fused = model(x)
    assert fused.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(fused.float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert not torch.allclose(base(x).float(), expected.float(), atol=2e-2)  # the LoRA counts


def test_fused_lora_replays_its_own_samples_exactly(tiny_pipeline):
    """Sampled and re-scored through the fused layers: ratio one, as the trainer needs."""
    from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers

    pipe = tiny_pipeline
    attach_lora(pipe.unet, 2, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    fuse_lora_layers(pipe.unet)
    assert_samples_replay_with_ratio_one(pipe)


def test_a_run_with_fused_lora_trains_as_peft_does_on_the_cpu(tiny_preset, tmp_path):
    """The trainer with speed.fused_lora: in fp32 on the CPU, where the fused matmul rounds
    as peft's separate ops do, two epochs give the same rewards and the same LoRA weights;
    the layers really took the fused path (a spy counts the calls that fused)."""
    from safetensors.torch import load_file

    import lowvram_ddpo.speed.lora_fusion as lora_fusion
    from lowvram_ddpo.trainer import Trainer

    calls = {"fused": 0}
    real = lora_fusion.fused_forward

    def spy(self, x, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["fused"] += lora_fusion._fusable_adapter(self, args, kwargs) is not None
        return real(self, x, *args, **kwargs)

    results = {}
    for fused in (False, True):
        config = load_preset(str(tiny_preset))
        apply_overrides(config, [f"speed.fused_lora={fused}", "run.progress=false"])
        lora_fusion.fused_forward = spy
        try:
            history = Trainer(config, tmp_path / str(fused)).fit()
        finally:
            lora_fusion.fused_forward = real
        weights = load_file(tmp_path / str(fused) / "pytorch_lora_weights.safetensors")
        results[fused] = ([m["reward_mean"] for m in history], weights)
    assert calls["fused"] > 0
    assert results[True][0] == results[False][0]
    assert results[True][1].keys() == results[False][1].keys()
    assert all(torch.equal(results[True][1][k], results[False][1][k]) for k in results[True][1])


@pytest.mark.parametrize("compiled", [False, True])
def test_channels_last_relays_the_frozen_convolutions_and_replays_exactly(
    compiled, tiny_pipeline, fresh_dynamo
):
    """speed.channels_last: the frozen 4-d weights in NHWC, the LoRA's (trained, saved to
    safetensors) as they were; sampled and re-scored in that layout, eager and through
    dynamo's graphs (``aot_eager``: what Inductor is given): ratio one."""
    from lowvram_ddpo.speed.channels_last import convolutions_in_channels_last

    pipe = tiny_pipeline
    attach_lora(pipe.unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    convs = [p for p in pipe.unet.parameters() if p.dim() == 4 and not p.requires_grad]
    relaid = convolutions_in_channels_last(pipe.unet)
    assert 0 < relaid <= len(convs)  # a 1x1 kernel is already both layouts at once
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    trained = [p for p in pipe.unet.parameters() if p.requires_grad and p.dim() == 4]
    assert trained and all(p.is_contiguous() for p in trained)  # LoRA's conv1 adapters
    assert convolutions_in_channels_last(pipe.unet) == 0  # once is enough
    if compiled:
        compile_unet(pipe.unet, "default", torch.device("cpu"), backend="aot_eager")
    assert_samples_replay_with_ratio_one(pipe)


def test_channels_last_has_inductor_lay_every_graph_out_channels_last(
    tiny_preset, tmp_path, monkeypatch
):
    """With speed.channels_last, Inductor's options force its layout optimisation (its
    heuristic keeps SD's training graph NCHW), and the trainer asks for it; without, the
    options are Inductor's own (the compile itself is spied: Inductor on the CPU takes
    minutes)."""
    import lowvram_ddpo.trainer as trainer_module
    from lowvram_ddpo.speed.compile import FORCED_LAYOUT, inductor_options

    assert inductor_options("default", channels_last=True)[FORCED_LAYOUT] is True
    assert FORCED_LAYOUT not in inductor_options("default")
    asked: dict[str, object] = {}
    monkeypatch.setattr(trainer_module, "compile_unet", lambda *a, **k: asked.update(k) or "")
    for nhwc in (True, False):
        config = load_preset(str(tiny_preset))
        apply_overrides(config, [f"speed.channels_last={nhwc}", "speed.compile='default'"])
        trainer_module.Trainer(config, tmp_path / str(nhwc)).setup()
        assert asked["channels_last"] is nhwc


def test_a_run_in_channels_last_trains_as_one_in_nchw_on_the_cpu(tiny_preset, tmp_path):
    """The trainer with speed.channels_last: its UNet's convolutions run NHWC, and two
    epochs give the rewards of the NCHW run (the same operations on the same values, fp32
    on the CPU, the kernels' summation order aside: 1.6e-4 apart after an update) with a
    LoRA that saves and loads; the settings report names it."""
    from safetensors.torch import load_file

    from lowvram_ddpo.memory.estimate import settings_of
    from lowvram_ddpo.trainer import Trainer

    rewards, weights = {}, {}
    for nhwc in (False, True):
        config = load_preset(str(tiny_preset))
        apply_overrides(config, [f"speed.channels_last={nhwc}", "run.progress=false"])
        trainer = Trainer(config, tmp_path / str(nhwc))
        history = trainer.fit()
        conv = trainer.pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) is nhwc
        assert settings_of(config)["channels_last"] is nhwc
        rewards[nhwc] = [m["reward_mean"] for m in history]
        weights[nhwc] = load_file(tmp_path / str(nhwc) / "pytorch_lora_weights.safetensors")
    assert rewards[True] == pytest.approx(rewards[False], rel=1e-3)
    assert weights[True].keys() == weights[False].keys()
    # Adam steps each weight by ~lr whatever its gradient's size: where a gradient is ~0
    # the sign of a rounding decides, so the LoRAs agree as wholes, not element by element
    for key, tensor in weights[True].items():
        apart = (tensor - weights[False][key]).norm() / weights[False][key].norm()
        assert apart < 0.05, (key, float(apart))  # measured: at most 0.033


def test_compile_mode_is_checked():
    from lowvram_ddpo.errors import UserError

    with pytest.raises(UserError, match="speed.compile must be one of"):
        compile_unet(torch.nn.Linear(1, 1), "fastest", torch.device("cpu"))
    with pytest.raises(UserError, match="cudagraphs needs a CUDA GPU"):
        compile_unet(torch.nn.Linear(1, 1), "cudagraphs", torch.device("cpu"))
    result = runner.invoke(
        app, ["bench", "speed", "--preset", "pocket-incompressibility", "--set",
              "speed.compile=fastest"],
    )  # fmt: skip
    assert result.exit_code == 2 and "speed.compile must be one of" in result.output
    result = runner.invoke(
        app, ["bench", "speed", "--preset", "pocket-incompressibility", "--set",
              "speed.compile=cudagraphs"],
    )  # fmt: skip
    if not torch.cuda.is_available():
        assert result.exit_code == 2 and "cudagraphs needs a CUDA GPU" in result.output


def test_inductor_on_a_gpu_needs_triton_a_c_compiler_and_pythons_headers(monkeypatch, tmp_path):
    """Before loading, a GPU run under an Inductor mode checks what Triton needs at its
    first compile, minutes later: Triton itself, then on Linux a C compiler and Python's
    headers (its kernel launcher is built as a Python extension); each missing piece is
    named in one line. CUDA graphs need none of it."""
    import lowvram_ddpo.speed.compile as compiling
    from lowvram_ddpo.errors import UserError

    cuda = torch.device("cuda")
    schemes: list[str] = []  # Debian's posix_local is read as posix_prefix, as Triton does
    monkeypatch.setattr(compiling.sysconfig, "get_default_scheme", lambda: "posix_local")
    monkeypatch.setattr(
        compiling.sysconfig, "get_paths", lambda scheme: schemes.append(scheme) or {"include": "/i"}
    )
    assert compiling.python_headers() == Path("/i/Python.h") and schemes == ["posix_prefix"]
    monkeypatch.undo()
    monkeypatch.setattr(compiling, "has_triton", lambda: False)
    assert compiling.inductor_gpu_missing().startswith("Triton (`pip install triton`")
    with pytest.raises(UserError, match=r"needs Triton .*; or set speed.compile=cudagraphs"):
        compiling.check_compile_mode("default", cuda)
    compiling.check_compile_mode("cudagraphs", cuda)
    monkeypatch.setattr(compiling, "has_triton", lambda: True)
    monkeypatch.setattr(compiling.sys, "platform", "linux")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert compiling.inductor_gpu_missing().startswith("a C compiler")
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(compiling, "python_headers", lambda: tmp_path / "Python.h")
    assert compiling.inductor_gpu_missing().startswith("Python's C headers")
    (tmp_path / "Python.h").write_text("")
    assert compiling.inductor_gpu_missing() == ""
    compiling.check_compile_mode("default", cuda)  # nothing missing: no error


def test_the_recompile_limit_is_raised_by_the_names_this_torch_has(monkeypatch):
    """torch 2.7 renamed dynamo's cache_size_limit to recompile_limit (the package takes
    torch >= 2.4): the limit is raised by whichever names there are, within the cap."""
    from types import SimpleNamespace

    import lowvram_ddpo.speed.compile as compiling

    old_torch = SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=24)
    monkeypatch.setattr(compiling, "dynamo_config", old_torch)
    compiling.raise_recompile_limit(32)
    assert old_torch.cache_size_limit == 24  # the cap on all entries
    new_torch = SimpleNamespace(recompile_limit=8, accumulated_recompile_limit=256)
    monkeypatch.setattr(compiling, "dynamo_config", new_torch)
    compiling.raise_recompile_limit(32)
    assert new_torch.recompile_limit == 32


def test_a_compile_that_fails_leaves_the_run_eager_with_one_line(fresh_dynamo):
    """A compiler that fails (here a backend that raises, in its forward compile, then in
    its backward's, which the trainer has compiled with the forward) does not end the run:
    the call and every later one run eagerly, the same numbers, and one line says why.
    Any other error of a call is raised as it is."""
    import torch._functorch.config as functorch_config
    from torch._dynamo import register_backend
    from torch._dynamo.backends.common import aot_autograd

    def no_kernels(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("no kernels for this card")

    register_backend(no_kernels, name="lowvram_ddpo_no_kernels")
    forward_only = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=no_kernels)
    register_backend(forward_only, name="lowvram_ddpo_no_backward_kernels")
    # lazy until compile_unet sets it (fresh_dynamo puts it back; pytest's monkeypatch
    # would delete, and so hide, a torch config entry at its undo)
    functorch_config.force_non_lazy_backward_lowering = False
    torch.manual_seed(0)
    x = torch.randn(3, 4)

    for backend in ("lowvram_ddpo_no_kernels", "lowvram_ddpo_no_backward_kernels"):
        layer = Small()
        expected = layer(x)
        heard: list[str] = []
        compile_unet(layer, "default", torch.device("cpu"), backend=backend, say=heard.append)
        out = layer(x)  # the training call: forward and backward compile here
        out.square().sum().backward()
        assert torch.equal(out, expected) and layer.linear.weight.grad is not None
        assert len(heard) == 1 and "compiling the UNet failed (" in heard[0], heard
        assert "no kernels for this card" in heard[0] and "runs eagerly from here" in heard[0]
        assert (
            "this epoch's samples were drawn by the compiled calls" in heard[0]
        )  # a training call
        assert layer._compiled_call_impl is None
        layer(x)
        assert len(heard) == 1  # said once
    sampling_layer, heard = Small(), []  # a call without gradients: nothing mixed
    compile_unet(sampling_layer, "default", torch.device("cpu"), backend="lowvram_ddpo_no_kernels",
                 say=heard.append)  # fmt: skip
    with torch.no_grad():
        sampling_layer(x)
    assert len(heard) == 1 and "samples were drawn" not in heard[0], heard
    with pytest.raises(ValueError, match="a call's own error"):
        broken = Small()
        compile_unet(broken, "default", torch.device("cpu"), backend="eager", say=heard.append)
        broken.register_forward_pre_hook(
            lambda *_: (_ for _ in ()).throw(ValueError("a call's own error"))
        )
        broken(x)

    def out_of_memory(gm, example_inputs):  # noqa: ANN001, ANN202
        raise torch.cuda.OutOfMemoryError("CUDA out of memory while autotuning")

    register_backend(out_of_memory, name="lowvram_ddpo_out_of_memory")
    full = Small()  # dynamo wraps it as a compile failure: raised as what it is
    compile_unet(full, "default", torch.device("cpu"), backend="lowvram_ddpo_out_of_memory")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="while autotuning"):
        full(x)


def test_sd15_unet_flops_match_the_published_count():
    """0.80 TFLOP per 512 px latent for one SD 1.5 UNet forward (the H100 notes, counted with
    the same FlopCounterMode); guidance doubles a sampling step; training a step costs its
    forward and a backward through the frozen base."""
    config = load_preset("incompressibility")
    flops = epoch_flops(config, "sd15")
    assert flops.forward_per_latent / 1e12 == pytest.approx(0.80, abs=0.02)
    per_step = flops.sampling_per_image / config.sample.num_steps
    assert per_step == pytest.approx(2 * flops.forward_per_latent, rel=0.01)
    training_per_step = flops.training_per_image / config.sample.num_steps
    # 2 latents x (a forward + a backward through the frozen base: gradients of the
    # activations, ~1 forward, and of the LoRA weights, small)
    assert 2 * 2.0 < training_per_step / flops.forward_per_latent < 2 * 2.3
    derived = epoch_flops(config, "sd15", count_backward=False)  # what --vram uses
    assert derived.training_per_image == pytest.approx(flops.training_per_image, rel=0.01)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("incompressibility-rwr", []),  # guided sampling, unguided training
        ("incompressibility", ["train.kl_coef=0.01"]),  # the KL guard's base forward
    ],
)
def test_derived_and_counted_training_flops_predict_the_same_epoch(preset, overrides):
    """`--vram` derives training's arithmetic from the sampling step; `bench speed` counts
    it: the two agree on RWR (which trains one latent per image where sampling runs two)
    and on the KL guard's extra forward (counted once, not also added by the time model),
    checkpointing's recomputation included."""
    from lowvram_ddpo.speed.time_model import Gpu, predict_epoch

    config = load_preset(preset)
    apply_overrides(config, [*overrides, "memory.gradient_checkpointing=true"])
    counted = epoch_flops(config, "sd15")
    derived = epoch_flops(config, "sd15", count_backward=False)
    slow = Gpu.listed("slow card", 20.0)  # arithmetic bounds every call
    by_count = predict_epoch(config, counted, slow).training
    by_derivation = predict_epoch(config, derived, slow).training
    assert by_count == pytest.approx(by_derivation, rel=0.05)
    assert counted.recomputed_per_step(config.memory, 50) == derived.recomputed_per_step(
        config.memory, 50
    )


def test_known_gpus_have_a_rate_and_unknown_ones_none():
    assert dense_fp16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_fp16_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_fp16_tflops("NVIDIA L40S") == 362.05
    assert dense_fp16_tflops("NVIDIA L4") == 121.0
    assert dense_fp16_tflops("Some Future GPU") is None


def test_geforce_cards_get_the_rate_their_sms_and_clock_give():
    """The hobbyist's cards: SMs x boost clock x 512 FLOPs, the rule the two GeForce
    datasheet figures follow (within 0.5%); the most specific name wins; a laptop's card,
    whose clock its power limit sets, gets none (the time model measures it)."""
    from lowvram_ddpo.speed.devices import geforce_tflops

    assert geforce_tflops(82, 1695) == pytest.approx(71.0, rel=0.005)  # RTX 3090, listed
    assert geforce_tflops(128, 2520) == pytest.approx(165.2, rel=0.005)  # RTX 4090, listed
    assert dense_fp16_tflops("NVIDIA GeForce RTX 4090") == 165.2  # the datasheet's own
    rates = {
        name: dense_fp16_tflops(f"NVIDIA GeForce {name}")
        for name in ("RTX 4070", "RTX 4070 SUPER", "RTX 4070 Ti", "RTX 4070 Ti SUPER")
    }
    assert rates["RTX 4070"] == pytest.approx(geforce_tflops(46, 2475))
    assert rates["RTX 4070"] < rates["RTX 4070 SUPER"] < rates["RTX 4070 Ti"]
    assert rates["RTX 4070 Ti"] < rates["RTX 4070 Ti SUPER"]
    assert dense_fp16_tflops("NVIDIA GeForce RTX 3060") == pytest.approx(25.5, abs=0.1)
    assert dense_fp16_tflops("NVIDIA GeForce RTX 3060 Ti") == pytest.approx(32.4, abs=0.1)
    assert dense_fp16_tflops("NVIDIA GeForce RTX 4060 Laptop GPU") is None
    assert dense_fp16_tflops("NVIDIA GeForce RTX 2080 with Max-Q Design") is None


def test_a_card_is_named_by_whole_words_and_an_unlisted_variant_gets_no_rate():
    """A listed name inside another card's ("A100" in "RTX A1000", "T4" in "T400") or
    followed by a variant word ("RTX 4090 D", fewer SMs) is not that card: no rate (MFU
    needs --peak-tflops; the time model measures the card) rather than a wrong one."""
    assert dense_fp16_tflops("NVIDIA RTX A1000") is None
    assert dense_fp16_tflops("NVIDIA T400 4GB") is None
    assert dense_fp16_tflops("NVIDIA GeForce RTX 4090 D") is None
    assert dense_fp16_tflops("Tesla T4") == 65.0
    assert dense_fp16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_fp16_tflops("NVIDIA L40") == 181.05
    assert dense_fp16_tflops("NVIDIA GeForce RTX 3090 Ti") > dense_fp16_tflops(
        "NVIDIA GeForce RTX 3090"
    )


def test_bench_speed_times_a_real_run_and_reports_mfu():
    """On the CPU with the pocket model: three short epochs, the last two timed (their
    mean); MFU from the counted FLOPs and the rate given."""
    result = runner.invoke(
        app,
        ["bench", "speed", "--preset", "pocket-incompressibility", "--batches", "1",
         "--epochs", "3", "--set", "sample.num_steps=2", "--set", "sample.batch_size=4",
         "--set", "train.batch_size=4", "--set", "train.gradient_accumulation_steps=1",
         "--peak-tflops", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the report alone: the epoch lines go to stderr
    assert report["images"] == 4 and report["device"] == "cpu"
    assert "epoch 3/3" in result.output  # the epoch lines are there; a random-weight
    assert "unknown to the pocket model" not in result.output  # tokenizer's words are not
    seconds = report["seconds"]
    assert seconds["epoch"] > 0 and seconds["training"] > 0 and seconds["sampling"] > 0
    assert seconds["epoch"] >= seconds["training"]
    timed = report["timed_epoch_seconds"]
    assert len(timed) == 2 and seconds["epoch"] == pytest.approx(sum(timed) / 2)
    assert report["images_per_second"] == pytest.approx(4 / seconds["epoch"])
    slowest, fastest = report["images_per_second_range"]  # the timed epochs' spread
    assert slowest == pytest.approx(4 / max(timed)) and fastest == pytest.approx(4 / min(timed))
    assert slowest <= report["images_per_second"] <= fastest
    for phase in ("sampling", "training", "epoch"):
        assert 0 < report["mfu"][phase] < 1
    work = report["unet_tflop_per_image"]
    expected = work["training"] * 1e12 * 4 / seconds["training"] / 1e12
    assert report["mfu"]["training"] == pytest.approx(expected)
    # no checkpointing: nothing computed twice
    assert report["mfu_training_with_recomputation"] == report["mfu"]["training"]
    # the phase meter splits sampling: the denoising and the decode, inside its seconds
    phases = report["phase_seconds"]
    assert phases["sampling"] > 0 and phases["decode"] > 0 and phases["training"] > 0
    assert phases["sampling"] + phases["decode"] <= seconds["sampling"]
    denoising = work["sampling"] * 1e12 * 4 / phases["sampling"] / 1e12
    assert report["mfu_denoising"] == pytest.approx(denoising)
    assert report["mfu_denoising"] > report["mfu"]["sampling"]
    # the memory estimate of the same settings, per phase: a GPU row's calibration check
    estimate = report["memory_estimate"]
    assert {"sampling", "decode", "training"} <= estimate.keys()
    assert all(p["reserved"] >= p["allocated"] > 0 for p in estimate.values())
    assert report["settings"]["compile"] == "off"
    assert report["compile_cache"] and not any(report["compile_cache"].values())  # eager
    # the whole run as the preset has it, at the timed rate: what a user plans around
    preset = load_preset("pocket-incompressibility")
    images = preset.run.epochs * 4 * preset.sample.batches_per_epoch
    assert report["run"]["images"] == images
    assert report["run"]["seconds"] == pytest.approx(images / report["images_per_second"])
    # sampled and trained 4 at a time in fp32: every epoch's replay exact
    assert report["replay"] == {"replay_rms": 0.0, "replay_clipfrac": 0.0, "clip_range": 1e-4}


def test_bench_speed_puts_the_memory_estimate_beside_each_measured_phase():
    """On a GPU the text report gives each phase's measured peak and, on the next line,
    the estimate's for the same settings (faked peaks: a CPU measures none)."""
    from lowvram_ddpo.speed.bench import SpeedReport
    from lowvram_ddpo.speed.flops import EpochFlops

    gib = 2**30
    report = SpeedReport(
        arch="sd15", device="H100", settings={}, images=8,
        seconds={"sampling": 2.6, "reward": 0.0, "training": 7.6, "epoch": 10.3},
        warmup_seconds=233.0, flops=EpochFlops(80e12, 171e12, 0.8e12), peak_tflops=None,
        peak_reserved_bytes=int(7.21 * gib),
        peak_so_far_by_epoch=[{
            "peak_reserved_bytes": int(7.21 * gib), "peak_allocated_bytes": int(5.59 * gib),
            "peak_reserved_bytes_decode": int(7.21 * gib),
            "peak_allocated_bytes_decode": int(5.59 * gib),
        }],
        estimated_peaks={"decode": {"reserved": int(4.99 * gib), "allocated": int(4.50 * gib)}},
    )  # fmt: skip
    text = report.to_text()
    assert "peak by phase, reserved / allocated: decode 7.21 GB / 5.59 GB" in text
    assert "the memory estimate by phase, reserved / allocated: decode 4.99 GB / 4.50 GB" in text
    report.estimated_peaks = {}  # the estimate failed: no empty line in its place
    assert "the memory estimate by phase" not in report.to_text()
    assert "timed epochs" not in text  # one timed epoch: no spread to give
    report.timed_epoch_seconds = [10.0, 10.6]  # two: the slowest's and fastest's rates
    assert "throughput 0.777 images/s (0.755-0.800 over 2 timed epochs)" in report.to_text()


def test_a_failing_memory_estimate_leaves_the_measured_row_whole(monkeypatch):
    """The estimate beside a row comes after minutes of GPU time: should it fail, a note
    says so and the measured figures stand."""
    import lowvram_ddpo.speed.bench as bench

    def broken(config, arch):  # noqa: ANN001, ANN202, ARG001
        raise RuntimeError("no meta kernel for this layer")

    monkeypatch.setattr(bench, "estimate_memory", broken)
    notes: list[str] = []
    assert bench.estimated_peaks(load_preset("pocket-incompressibility"), "pocket", notes) == {}
    assert notes == ["no memory estimate beside the measured peaks: no meta kernel for this layer"]


def test_checkpointings_second_forward_is_counted_beside_mfu():
    """Training's MFU counts the work the run needs; checkpointing also runs the forward
    of its levels again in the backward: `bench speed` gives the rate counting it too
    (on the H100 of 2026-11-27, fitted to 7 GB: 76.7 TFLOP per image recomputed beside
    171.4 needed, so 18.4% MFU was 26.6% of the card's rate in arithmetic run)."""
    from lowvram_ddpo.memory.fit import fit_to_vram
    from lowvram_ddpo.memory.units import parse_size
    from lowvram_ddpo.speed.bench import SpeedReport

    config = load_preset("incompressibility")
    apply_overrides(config, ["memory.optimizer=adamw"])
    fitted = fit_to_vram(config, "sd15", parse_size("7GB")).config
    assert fitted.memory.gradient_checkpointing and fitted.memory.uncheckpointed_levels == 1
    flops = epoch_flops(fitted, "sd15")
    per_step = flops.recomputed_per_step(fitted.memory, fitted.sample.num_steps)
    guided_forward = flops.sampling_per_image / fitted.sample.num_steps
    assert 0.9 * guided_forward < per_step < guided_forward  # one level kept out
    fitted.memory.gradient_checkpointing = False
    assert flops.recomputed_per_step(fitted.memory, fitted.sample.num_steps) == 0.0
    report = SpeedReport(
        arch="sd15", device="H100", settings={}, images=8,
        seconds={"sampling": 2.6, "reward": 0.0, "training": 7.6, "epoch": 10.3},
        warmup_seconds=233.0, flops=flops, peak_tflops=989.4, peak_reserved_bytes=None,
        recomputed_per_image=per_step * flops.trained_steps,
    )  # fmt: skip
    ratio = report.mfu_with_recomputation() / report.mfu("training")
    assert ratio == pytest.approx(1 + per_step * flops.trained_steps / flops.training_per_image)
    assert 1.4 < ratio < 1.5  # LoRA's backward is light: the second forward weighs
    assert "counting checkpointing's recomputation" in report.to_text()


def test_time_model_reproduces_the_h100_unet_calls_and_ranks_by_card():
    """Per training micro-step on the H100: ~167 ms at micro-batch 1 and 4 (launch-bound),
    ~286 ms with checkpointing; so micro-batch 4 with checkpointing beats micro-batch 1
    without there, and loses on a card 20x slower, where arithmetic dominates."""
    from lowvram_ddpo.speed.time_model import (
        TRAINING_LOOP_OVERHEAD,
        Gpu,
        predict_epoch,
    )

    config = load_preset("incompressibility")
    flops = epoch_flops(config, "sd15")
    h100, slow = Gpu.listed("H100", 989.4), Gpu.listed("slow card", 989.4 / 20)

    def per_micro_step(gpu: Gpu, micro: int, checkpointing: bool) -> float:
        trial = load_preset("incompressibility")
        trial.speed.compile = "off"  # the eager calls measured
        trial.train.batch_size = micro
        trial.train.gradient_accumulation_steps = 64 // micro
        trial.memory.gradient_checkpointing = checkpointing
        calls = 256 // micro * 50
        return predict_epoch(trial, flops, gpu).training / calls / TRAINING_LOOP_OVERHEAD

    assert per_micro_step(h100, 1, False) == pytest.approx(0.167, rel=0.05)
    assert per_micro_step(h100, 4, False) == pytest.approx(0.185, rel=0.15)
    assert per_micro_step(h100, 4, True) == pytest.approx(0.288, rel=0.05)
    per_image = {m: per_micro_step(h100, m, c) / m for m, c in ((1, False), (4, True))}
    assert per_image[4] < per_image[1] / 2
    slow_per_image = {m: per_micro_step(slow, m, c) / m for m, c in ((1, False), (4, True))}
    assert slow_per_image[1] < slow_per_image[4]


@pytest.mark.parametrize(
    ("card", "micro", "overrides", "sampling", "training"),
    [
        ("H200", 8, ["speed.compile=off"], 0.532, 2.292),  # checkpointing, offload
        ("H200", 4, ["memory.gradient_checkpointing=false", "memory.offload=false",
                     "speed.compile=off"], 0.469, 2.274),
        ("H200", 4, ["memory.gradient_checkpointing=false", "memory.offload=false",
                     "speed.compile=cudagraphs", "speed.graph_sampling=true"], 0.474, 1.207),
        ("H100", 8, ["speed.compile=off"], 0.535, 1.924),  # attention checkpointed whole
        ("H100", 8, ["memory.gradient_checkpointing=false", "memory.offload=false",
                     "speed.compile=cudagraphs"], 0.522, 1.171),  # what --vram picks there
        ("H100", 8, [], 0.350, 0.982),  # the preset's Inductor (speed.compile=default)
        # --vram 7GB's pick, side by side with the reference (2026-11-26 late): one level
        # kept out of checkpointing, nothing offloaded, 4 images per decode, Inductor
        ("H100", 8, ["memory.uncheckpointed_levels=1", "memory.offload=false",
                     "memory.decode_batch=4"], 0.333, 0.979),
        # the same fit on an H200 (2026-11-27: 2 images per decode since the decode's
        # calibration; the mean of two runs, 0.339 / 0.907 and 0.316 / 0.864)
        ("H200", 8, ["memory.uncheckpointed_levels=1", "memory.offload=false",
                     "memory.decode_batch=2"], 0.328, 0.886),
        # the reference's settings with Inductor's graphs, side by side (H100, 2026-11-27:
        # 3.63x the reference; predicted 0.332 / 0.777 before it ran)
        ("H100", 4, ["memory.gradient_checkpointing=false", "memory.offload=false",
                     "speed.compile=reduce-overhead"], 0.338, 0.794),
    ],
)  # fmt: skip
def test_time_model_reproduces_the_gpu_epochs(card, micro, overrides, sampling, training):
    """Seconds per image of `bench speed` (SD 1.5, 512 px, 8 images per epoch;
    docs/benchmarks.md) within 15%: on an H200 (2026-11-26) eager at micro-batch 8 with
    checkpointing and at 4 without, and at 4 with CUDA graphs (no launch floor, arithmetic
    only); on an H100 (2026-11-26) the first again, micro-batch 8 with graphs, and the
    first with Inductor (the Inductor factors were fitted to that row: this checks that
    its calls take them, the eager and graphed ones not), and `--vram 7GB`'s pick, a row
    the model had predicted before it ran (0.318 / 0.968 against 0.333 / 0.979), and again
    on an H200 (2026-11-27); on an H100 (2026-11-27) micro-batch 4 under
    ``reduce-overhead``, also predicted before it ran."""
    from lowvram_ddpo.speed.time_model import Gpu, predict_epoch

    config = load_preset("incompressibility")
    apply_overrides(
        config,
        [f"train.batch_size={micro}", f"train.gradient_accumulation_steps={64 // micro}",
         "memory.gradient_checkpointing=true", *overrides],
    )  # fmt: skip
    config.sample.batches_per_epoch = 1
    predicted = predict_epoch(config, epoch_flops(config, "sd15"), Gpu.listed(card, 989.4))
    images = config.sample.batch_size
    assert predicted.sampling / images == pytest.approx(sampling, rel=0.15)
    assert predicted.training / images == pytest.approx(training, rel=0.15)


def test_time_model_gives_inductors_calls_a_faster_rate_and_fewer_launches():
    """Inductor's fused kernels (speed.compile=default): where arithmetic bounds a call
    (a slow card) the training runs INDUCTOR_RATE_GAIN faster; where the host's launches
    do (the H100 at micro-batch 1) INDUCTOR_HOST_SHARE of eager's; CUDA graphs without
    Inductor keep eager's rate."""
    from lowvram_ddpo.speed.time_model import (
        INDUCTOR_HOST_SHARE,
        INDUCTOR_RATE_GAIN,
        Gpu,
        predict_epoch,
    )

    def training(compile_mode: str, gpu: Gpu, micro: int, scope: str = "model") -> float:
        config = load_preset("incompressibility")
        apply_overrides(config, [f"speed.compile={compile_mode}", f"train.batch_size={micro}",
                                 f"train.gradient_accumulation_steps={64 // micro}",
                                 f"speed.compile_scope={scope}"])  # fmt: skip
        return predict_epoch(config, epoch_flops(config, "sd15"), gpu).training

    slow, h100 = Gpu.listed("slow card", 989.4 / 20), Gpu.listed("H100", 989.4)
    gain = training("off", slow, 8) / training("default", slow, 8)
    assert gain == pytest.approx(INDUCTOR_RATE_GAIN["training"])
    # by blocks: less fusion, the H100's 0.944 against 1.102 s of training per image
    by_blocks = training("off", slow, 8) / training("default", slow, 8, scope="blocks")
    assert by_blocks == pytest.approx(INDUCTOR_RATE_GAIN["training"] * 0.944 / 1.102, rel=1e-3)
    launches = training("default", h100, 1) / training("off", h100, 1)
    assert launches == pytest.approx(INDUCTOR_HOST_SHARE)
    assert training("cudagraphs", slow, 8) == pytest.approx(training("off", slow, 8))


def test_time_model_puts_a_floor_under_small_graphed_calls():
    """CUDA graphs take the host's launches away, not the GPU's per-kernel time: the RLCM
    preset's graphed training (2 latents per call) ran 0.249 s per image on an H100
    (2026-11-26), 2.6x what its arithmetic alone predicts; eager it ran 0.653. (The floor
    was fitted to that row: this checks that graphed calls take it, eager ones not.)"""
    from lowvram_ddpo.speed.time_model import Gpu, predict_epoch

    config = load_preset("rlcm-incompressibility")
    apply_overrides(config, ["memory.vram=off", "train.gradient_accumulation_steps=2"])
    config.sample.batches_per_epoch = 1  # the bench's one batch of 4
    flops = epoch_flops(config, "sd15-lcm")
    h100 = Gpu.listed("H100", 989.4)
    graphed = predict_epoch(config, flops, h100).training / 4
    assert graphed == pytest.approx(0.249, rel=0.15)
    config.speed.compile = "off"
    eager = predict_epoch(config, flops, h100).training / 4
    assert eager == pytest.approx(0.653, rel=0.25) and eager > 2 * graphed


def test_time_model_counts_each_images_decode():
    """The VAE's decode adds its counted FLOPs per image (2.5 TFLOP for SD 1.5 at 512 px:
    3% of a 50-step guided rollout, 39% of an 8-step LCM's) at its measured share of the
    UNet's rate, and a fixed cost per decode call; SDXL's tiled decode counts its
    overlapping tiles, so a fit weighs tiling's time too."""
    import dataclasses

    from lowvram_ddpo.speed.time_model import (
        DECODE_CALL_SECONDS,
        DECODE_RATE_SHARE,
        OFFLOAD_SAMPLING_COST,
        SAMPLING_LOOP_OVERHEAD,
        Gpu,
        decode_seconds,
        predict_epoch,
    )

    slow = Gpu.listed("slow card", 20.0)  # arithmetic-bound: every FLOP shows
    config = load_preset("incompressibility")
    flops = epoch_flops(config, "sd15", count_backward=False)
    assert flops.decode_per_image / 1e12 == pytest.approx(2.5, abs=0.1)
    assert flops.tiled_decode_per_image == flops.decode_per_image  # one tile covers 512 px
    without = dataclasses.replace(flops, decode_per_image=0.0, tiled_decode_per_image=0.0)
    added = (
        predict_epoch(config, flops, slow).sampling - predict_epoch(config, without, slow).sampling
    )
    samples = config.sample.batch_size * config.sample.batches_per_epoch
    rate = slow.unet_tflops * 1e12 * DECODE_RATE_SHARE["autocast"]
    expected = samples * flops.decode_per_image / rate * SAMPLING_LOOP_OVERHEAD
    offload = OFFLOAD_SAMPLING_COST if config.memory.offload else 1.0
    assert added == pytest.approx(expected * offload, rel=1e-6)
    # each call's fixed cost: one image per call against a whole sampling batch per call
    each, whole = copy.deepcopy(config), copy.deepcopy(config)
    each.memory.decode_batch, whole.memory.decode_batch = 1, config.sample.batch_size
    calls_saved = samples - config.sample.batches_per_epoch
    saved = decode_seconds(each, flops, slow) - decode_seconds(whole, flops, slow)
    assert saved == pytest.approx(calls_saved * DECODE_CALL_SECONDS["autocast"], rel=1e-6)
    sdxl = load_preset("sdxl-aesthetic")
    tiles = epoch_flops(sdxl, "sdxl", count_backward=False)
    assert tiles.tiled_decode_per_image > 1.4 * tiles.decode_per_image
    untiled = copy.deepcopy(sdxl)
    untiled.memory.vae_tiling = False
    gap = predict_epoch(sdxl, tiles, slow).sampling - predict_epoch(untiled, tiles, slow).sampling
    assert gap > 0


@pytest.mark.parametrize(
    ("kind", "widths_ms"),
    [
        ("autocast", {1: 27.1, 2: 24.16, 4: 20.95, 8: 19.47}),
        ("half", {1: 23.16, 2: 20.6, 4: 17.56, 8: 16.0}),
        ("compiled", {2: 10.06, 4: 8.96}),
    ],
)
def test_time_model_reproduces_the_h200s_decodes(kind, widths_ms):
    """The VAE's decode alone on an H200 (2026-11-27, SD 1.5 at 512 px, fp16,
    `benchmarks/decode_batch.py`), ms per image at each number of images per call: the
    model within 10% for each kind (under autocast, speed.half_decode, speed.compile_decoder),
    wider calls faster, and compiled faster than half, faster than autocast."""
    from lowvram_ddpo.speed.time_model import Gpu, decode_kind, decode_seconds

    config = load_preset("incompressibility")
    config.sample.batch_size, config.sample.batches_per_epoch = 8, 1
    config.speed.half_decode = kind == "half"
    config.speed.compile_decoder = kind == "compiled"
    assert decode_kind(config) == kind
    flops = epoch_flops(config, "sd15", count_backward=False)
    h200 = Gpu.listed("H200", 989.4)
    predicted = {}
    for width, measured in widths_ms.items():
        config.memory.decode_batch = width
        predicted[width] = decode_seconds(config, flops, h200) / 8 * 1000
        assert predicted[width] == pytest.approx(measured, rel=0.10)
    assert list(predicted.values()) == sorted(predicted.values(), reverse=True)
    config.memory.decode_batch = 2
    by_kind = {}
    for other in ("autocast", "half", "compiled"):
        config.speed.half_decode = other == "half"
        config.speed.compile_decoder = other == "compiled"
        by_kind[other] = decode_seconds(config, flops, h200)
    assert by_kind["compiled"] < by_kind["half"] < by_kind["autocast"]
    config.memory.vae_tiling = True  # a tiled decode compiles nothing
    assert decode_kind(config) == "autocast"


def test_calls_without_gradients_add_a_guided_forward_per_trained_step():
    """NFT's old policy and the KL guard's base model each cost a guided forward per trained
    image-step: on an arithmetic-bound card the KL guard adds sampling's per-step work to
    training's (80.4 + 171.4 over 171.4 TFLOP per image for SD 1.5)."""
    from lowvram_ddpo.speed.time_model import Gpu, predict_epoch

    slow = Gpu.listed("slow card", 20.0)
    config = load_preset("incompressibility")
    flops = epoch_flops(config, "sd15")
    plain = predict_epoch(config, flops, slow).training
    config.train.kl_coef = 0.01
    guarded = predict_epoch(config, flops, slow).training
    expected = (flops.training_per_image + flops.sampling_per_image) / flops.training_per_image
    assert guarded / plain == pytest.approx(expected, rel=1e-6)


def test_vram_fit_takes_the_fastest_setting_that_fits_and_says_how_long(monkeypatch, tmp_path):
    """The shipped preset trains at micro-batch 1; on an 8 GB card the fit trades it for a
    bigger micro-batch (on the calibrated H100 rate, assumed without a GPU), and prints
    the predicted epoch time beside the predicted peak, and the run's, with the first
    compile where the compile cache is empty (Inductor: minutes before the first image)."""
    import lowvram_ddpo.speed.compile_payoff as payoff
    from lowvram_ddpo.memory.fit import fit_to_vram
    from lowvram_ddpo.memory.units import GB
    from lowvram_ddpo.speed.time_model import predict_epoch

    cache = tmp_path / "cache"
    monkeypatch.setattr(payoff, "compile_cache_dir", lambda: cache)
    config = load_preset("incompressibility")
    payoff.mark_compiled(config)  # an earlier run's kernels
    fit = fit_to_vram(config, "sd15", 8 * GB)
    assert fit.config.train.batch_size > 1
    per_step = fit.config.train.batch_size * fit.config.train.gradient_accumulation_steps
    assert per_step == 64
    shipped = predict_epoch(config, epoch_flops(config, "sd15"), fit.gpu).total
    assert fit.epoch_seconds < shipped / 2
    summary = fit.summary("8GB")
    assert (
        "per epoch on an H100 (assumed: no GPU here) (time model; the run's 100 epochs: ~"
        in summary
    )
    from lowvram_ddpo.reporting.progress import format_duration

    hours = format_duration(100 * fit.epoch_seconds)
    assert summary.endswith(f"the run's 100 epochs: ~{hours})")  # what a hobbyist waits
    payoff.compiled_mark(config, "unet").unlink()  # a first run: Inductor compiles first
    compiling = format_duration(payoff.COLD_COMPILE_SECONDS["model"])
    cold = f"after ~{compiling} or more of compiling (once: cached))"
    assert fit.summary("8GB").endswith(f"the run's 100 epochs: ~{hours}, {cold}")
    fit.config.run.epochs = 1
    assert fit.summary("8GB").endswith(f"(time model; {cold}")
    fit.config.speed.compile = "off"
    assert fit.summary("8GB").endswith("(time model)")


def test_lora_layers_skip_their_input_casts_under_autocast_exactly(tiny_pipeline):
    """A half-precision base with an fp32 LoRA under autocast (bf16: CPU autocast's dtype):
    the UNet's output and the LoRA's gradients are bitwise the same without peft's casts."""
    from lowvram_ddpo.speed.lora_casts import skip_lora_input_casts

    unet = tiny_pipeline.unet.to(torch.bfloat16)
    params = attach_lora(unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    text = torch.randn(2, 16, 32, dtype=torch.bfloat16)

    def output_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, encoder_hidden_states=text).sample.float()
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    with_casts = output_and_grads()
    lora_layers = sum(1 for m in unet.modules() if hasattr(m, "lora_A"))
    assert skip_lora_input_casts(unet) == lora_layers > 0
    without = output_and_grads()
    assert torch.equal(with_casts[0], without[0])
    assert all(torch.equal(a, b) for a, b in zip(with_casts[1], without[1], strict=True))


def test_the_gpu_session_script_runs_its_stages_and_keeps_its_deadline(tmp_path):
    """benchmarks/gpu_session.sh is what a session lent a GPU runs (device time is scarce:
    it must work the first time). Its dry part runs the same machinery on the CPU: a
    stage's JSON lands in results.jsonl, and a stage that would start too close to the
    deadline is skipped and said so."""
    root = Path(__file__).parents[1]
    env = os.environ | {
        "OUT": str(tmp_path),
        "GPU_SESSION_BUDGET_S": "90",
        "GPU_SESSION_MIN_STAGE_S": "85",  # the first stage starts, the second cannot
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "dry"], cwd=root, env=env,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    bench, *skipped = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert bench["stage"] == "bench" and bench["rc"] == 0, bench
    assert bench["result"]["images"] == 16 and bench["result"]["images_per_second"] > 0
    deadline = "the part's deadline"
    assert skipped == [
        {"stage": "replay-off", "skipped": deadline},
        {"stage": "profile", "skipped": deadline},
    ]
    assert "replay-off               skipped (the part's deadline)" in done.stdout
    bench_line = next(line for line in done.stdout.splitlines() if line.startswith("bench "))
    assert "img/s" in bench_line and "  replay " in bench_line  # its path's own replay
    assert "epoch 2/2" in (tmp_path / "session.log").read_text()  # the run's own lines


def test_the_gpu_session_script_skips_the_stages_an_earlier_call_ran(tmp_path):
    """A second call on the warm machine names the stages done (GPU_SESSION_SKIP): they
    are skipped and said so, without running anything."""
    root = Path(__file__).parents[1]
    env = os.environ | {"OUT": str(tmp_path), "GPU_SESSION_SKIP": "bench,replay-off,profile"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "dry"], cwd=root, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    stages = ("bench", "replay-off", "profile")
    assert rows == [{"stage": s, "skipped": "GPU_SESSION_SKIP"} for s in stages]
    assert "bench: skipped (GPU_SESSION_SKIP)" in (tmp_path / "session.log").read_text()
    assert "bench                    skipped (GPU_SESSION_SKIP)" in done.stdout


def test_the_unet_profile_times_both_calls_and_sorts_every_kernel_by_kind():
    """benchmarks/unet_profile.py (a GPU session's look at where a UNet call's time goes)
    on the pocket model: both calls timed, every profiled kernel counted under one kind,
    and the adapters' own cost visible (switched off, the sampling call runs fewer ops)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import unet_profile

    args = SimpleNamespace(
        arch="pocket", sample_batch=2, micro_batch=1, repeats=1, warmup=1, top=3, sweep=""
    )
    cpu = torch.device("cpu")
    variants = ("eager", "no-lora", "half-norms+fused-lora")  # several joined by "+"
    rows = {v: unet_profile.profile_variant(args, v, cpu) for v in variants}
    eager = rows["eager"]
    assert set(eager) == {"sampling", "training"} and set(rows["no-lora"]) == {"sampling"}
    for row in eager.values():  # the pocket UNet's convolutions and projections are seen
        assert row["ms_per_call"] > 0 and row["kernels"] > 0
        assert row["by_kind_ms"]["convolution"] > 0 and row["by_kind_ms"]["matmul"] > 0
    assert eager["training"]["kernels"] > eager["sampling"]["kernels"]
    assert rows["no-lora"]["sampling"]["kernels"] < eager["sampling"]["kernels"]
    fused = rows["half-norms+fused-lora"]["training"]["kernels"]  # fewer LoRA ops
    assert fused < eager["training"]["kernels"]
    top = [k["ms"] for k in eager["training"]["top_kernels"]]  # the costliest, by name
    assert len(top) == 3 and top == sorted(top, reverse=True)
    assert top[0] <= eager["training"]["kernel_ms"]
    assert unet_profile.kind_of("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>") == "matmul"
    args.sweep = "1,2"  # the batch curve: both calls at each batch, times only
    curve = unet_profile.profile_variant(args, "eager", cpu)
    assert list(curve) == ["sampling@1", "training@1", "sampling@2", "training@2"]
    assert [row["latents"] for row in curve.values()] == [2, 2, 4, 4]  # guided
    assert all(row["ms_per_call"] > 0 and "kernels" not in row for row in curve.values())
    assert unet_profile.kind_of("pytorch_flash::flash_fwd_kernel") == "attention"
    assert unet_profile.kind_of("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert unet_profile.kind_of("void at::native::(anonymous)::RowwiseMomentsCUDAKernel") == (
        "normalisation"
    )
    # Inductor's kernels: by what they are, not by the op names fused into them
    assert unet_profile.kind_of("triton_poi_fused__to_copy_add_convolution_silu_3") == (
        "fused pointwise (Inductor)"
    )
    assert unet_profile.kind_of("triton_red_fused_native_group_norm_0") == (
        "fused reduction (Inductor: norms)"
    )
    assert unet_profile.kind_of("triton_tem_fused_convolution_1") == "convolution"
    # cuDNN's layout changes around an NCHW convolution: a kind apart, not convolution
    nchw = "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float>"
    assert unet_profile.kind_of(nchw) == "layout change (NCHW<->NHWC)"


def test_kernel_times_count_a_gpu_kernel_once_not_again_in_its_operator():
    """On a GPU the profiler gives an operator's row the device time of the kernels it
    launched, and each kernel a row of its own: the H100 profile of 2026-11-27 summed both
    (19.2 s by kind for 9.6 s of kernels). Kernels only on a GPU; operators on a CPU."""
    from types import SimpleNamespace

    from lowvram_ddpo.speed.kernel_kinds import kernel_times

    def event(name: str, device: str, device_us: float, cpu_us: float) -> SimpleNamespace:
        return SimpleNamespace(
            name=name,
            device_type=SimpleNamespace(name=device),
            self_device_time_total=device_us,
            self_cpu_time_total=cpu_us,
        )

    events = [
        event("aten::cudnn_convolution", "CPU", 300.0, 40.0),  # its kernel's time again
        event("sm90_xmma_fprop_implicit_gemm", "CUDA", 300.0, 0.0),
        event("aten::empty", "CPU", 0.0, 2.0),
    ]
    assert kernel_times(events, on_device=True) == [("sm90_xmma_fprop_implicit_gemm", 300.0)]
    assert kernel_times(events, on_device=False) == [
        ("aten::cudnn_convolution", 40.0),
        ("aten::empty", 2.0),
    ]


def test_a_unet_traced_in_pieces_is_said_in_one_line():
    """torch 2.11 split the checkpointed UNet at each attention layer (H100, 2026-11-26),
    and CUDA graphs then re-recorded every call: the trainer says so after its first epoch
    (``split_graph_note``), and says nothing for a whole trace, when nothing compiles, or
    for breaks from before the run's own compile."""
    from torch._dynamo.utils import counters

    from lowvram_ddpo.speed.compile import split_graph_note

    layer = torch.nn.Linear(4, 4)

    def whole(x: torch.Tensor) -> torch.Tensor:
        return layer(x).relu()

    def in_pieces(x: torch.Tensor) -> torch.Tensor:
        y = layer(x)
        torch._dynamo.graph_break()
        return y.relu()

    torch._dynamo.reset()
    counters.clear()
    torch.compile(whole, backend="eager")(torch.randn(2, 4))
    assert split_graph_note("cudagraphs") == ""
    torch.compile(in_pieces, backend="eager")(torch.randn(2, 4))
    note = split_graph_note("cudagraphs")
    assert "in pieces" in note and "speed.compile=off" in note and "\n" not in note
    assert split_graph_note("off") == ""
    # a run's compile starts the count afresh: an earlier model's breaks are not its own
    compile_unet(torch.nn.Linear(4, 4), "default", torch.device("cpu"), backend="eager")
    assert split_graph_note("cudagraphs") == ""
    counters.clear()


def test_half_norms_run_in_autocasts_dtype_and_leave_the_rest_as_it_was():
    """speed.half_norms: under autocast a GroupNorm or LayerNorm given a float32 input runs
    in autocast's dtype (CUDA autocast would run it in float32; on the CPU the input's dtype
    shows the difference); without autocast the UNet's output is bitwise the plain one;
    under autocast close to it, with LoRA gradients; names, deep copies and dynamo's
    single graph are kept, and the plain norms come back."""
    from diffusers import UNet2DConditionModel
    from tiny import TINY_UNET

    from lowvram_ddpo.memory.checkpointing import disable_checkpointing, enable_checkpointing
    from lowvram_ddpo.speed.half_norms import (
        HalfGroupNorm,
        HalfLayerNorm,
        restore_norms,
        run_norms_in_half,
    )

    group, layer, x = torch.nn.GroupNorm(2, 8), torch.nn.LayerNorm(8), torch.randn(2, 8, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group(x).dtype == layer(x).dtype == torch.float32
        run_norms_in_half(group)
        run_norms_in_half(layer)
        assert isinstance(group, HalfGroupNorm) and isinstance(layer, HalfLayerNorm)
        assert group(x).dtype == layer(x).dtype == torch.bfloat16
    assert group(x).dtype == torch.float32  # autocast off: the plain forward

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    params = attach_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    for p in params:  # LoRA's up-projection starts at zero: give it something to carry
        p.data.normal_(0, 0.1)
    names = [n for n, _ in unet.named_parameters()]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([500, 20])

    def call(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = unet(latents, t, encoder_hidden_states=text).sample.float()
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    plain = {autocast: call(autocast) for autocast in (False, True)}
    count = run_norms_in_half(unet)
    assert count >= 10 and [n for n, _ in unet.named_parameters()] == names
    full, _ = call(False)
    assert torch.equal(full, plain[False][0])
    out, grads = call(True)
    assert torch.allclose(out, plain[True][0], atol=0.05, rtol=0.05)
    flat, plain_flat = (
        torch.cat([g.flatten() for g in grads]),
        torch.cat([g.flatten() for g in plain[True][1]]),
    )
    assert flat.abs().sum() > 0
    assert F.cosine_similarity(flat, plain_flat, dim=0) > 0.99
    twin = copy.deepcopy(unet)
    assert sum(isinstance(m, HalfGroupNorm) for m in twin.modules()) > 0

    def traced() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(latents, t, encoder_hidden_states=text).sample

    assert torch._dynamo.explain(traced)().graph_break_count == 0
    enable_checkpointing(unet)  # the trainer's checkpointing around them: one graph still
    assert torch._dynamo.explain(traced)().graph_break_count == 0
    disable_checkpointing(unet)
    restore_norms(unet)
    assert not any(isinstance(m, HalfGroupNorm | HalfLayerNorm) for m in unet.modules())


def test_the_trainer_gives_its_unet_half_norms_when_asked(tiny_preset, tmp_path):
    """speed.half_norms=true: the trained UNet's norms take the half-precision forward (a
    no-op here, in full precision: the run trains as without it)."""
    from lowvram_ddpo.speed.half_norms import HalfGroupNorm
    from lowvram_ddpo.trainer import Trainer

    rewards = {}
    for half in (False, True):
        config = load_preset(str(tiny_preset))
        apply_overrides(config, ["run.epochs=1", "run.progress=false", f"speed.half_norms={half}"])
        trainer = Trainer(config, tmp_path / str(half))
        rewards[half] = [m["reward_mean"] for m in trainer.fit()]
        halves = sum(isinstance(m, HalfGroupNorm) for m in trainer.pipe.unet.modules())
        assert (halves > 0) == half
    assert rewards[True] == rewards[False]


def test_the_trainer_lets_cudnn_time_its_convolutions_only_when_asked(tiny_preset, tmp_path):
    """speed.cudnn_benchmark sets PyTorch's global switch for the run, both ways (a run
    after one that asked must not keep it), and the settings report names it."""
    from lowvram_ddpo.memory.estimate import settings_of
    from lowvram_ddpo.trainer import Trainer

    before = torch.backends.cudnn.benchmark
    try:
        for asked in (True, False):
            config = load_preset(str(tiny_preset))
            apply_overrides(config, ["run.progress=false", f"speed.cudnn_benchmark={asked}"])
            Trainer(config, tmp_path / str(asked)).setup()
            assert torch.backends.cudnn.benchmark is asked
            assert settings_of(config)["cudnn_benchmark"] is asked
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_fit_trains_at_the_sampling_batch_where_that_costs_little(monkeypatch):
    """A training micro-batch other than the sampling batch re-scores with other kernels
    (on an H100 the ratio then started 0.71 of the clip range off 1): on a card whose
    arithmetic bounds sampling, where a smaller sampling batch costs nothing, the fit
    samples at the training micro-batch for DDPO-IS; RWR, which clips no ratio, keeps
    the preset's sampling batch. Images per epoch and per step are kept either way."""
    import lowvram_ddpo.memory.fit as fit
    from lowvram_ddpo.memory.units import GB
    from lowvram_ddpo.preflight import rescores_at_other_shapes
    from lowvram_ddpo.speed.time_model import Gpu

    monkeypatch.setattr(fit, "this_gpu", lambda: Gpu.listed("slow card", 40.0))
    picks = {}
    for algorithm in ("ddpo-is", "rwr"):
        config = load_preset("incompressibility")
        config.train.algorithm = algorithm
        picks[algorithm] = fit.fit_to_vram(config, "sd15", 6 * GB).config
    exact, rwr = picks["ddpo-is"], picks["rwr"]
    assert exact.train.batch_size == exact.sample.batch_size and not rescores_at_other_shapes(exact)
    assert exact.sample.batch_size < 8  # the preference acted: the preset samples 8
    assert exact.sample.batch_size * exact.sample.batches_per_epoch == 256
    assert rwr.sample.batch_size == 8 and rwr.train.batch_size < 8
    assert not rescores_at_other_shapes(rwr)  # nothing clipped: nothing to be exact for


def test_a_run_that_trains_at_another_batch_than_it_samples_is_told_its_ratios_drift():
    """On a GPU in half precision, DDPO-IS re-scoring at another batch size than sampled
    runs other kernels (0.71 of the clip range on an H100): the run says so in one line;
    not for equal batches, full precision, the CPU, or an algorithm that clips nothing."""
    from lowvram_ddpo.preflight import replay_note

    config = load_preset("incompressibility")  # sampling 8, training 1
    note = replay_note(config, "cuda", "fp16")
    assert note and "train.batch_size 1 differs from sample.batch_size 8" in note
    assert "\n" not in note
    assert replay_note(config, "cpu", "fp16") is None
    assert replay_note(config, "cuda", "no") is None
    apply_overrides(config, ["train.batch_size=8", "train.gradient_accumulation_steps=8"])
    assert replay_note(config, "cuda", "fp16") is None
    rwr = load_preset("incompressibility-rwr")
    assert rwr.train.batch_size != rwr.sample.batch_size
    assert replay_note(rwr, "cuda", "fp16") is None


def test_bench_speed_on_a_gpu_reports_the_time_models_prediction_beside_it(monkeypatch):
    """On CUDA a `bench speed` row carries the time model's seconds per image for its
    card (what --vram ranks by) and the measured-over-predicted ratios: each GPU session's
    rows check the model's calibration. Here on the H100's calibrated rate."""
    from lowvram_ddpo.speed import bench, time_model
    from lowvram_ddpo.speed.time_model import Gpu

    monkeypatch.setattr(time_model, "this_gpu", lambda: Gpu.listed("H100", 989.4))
    config = load_preset("incompressibility")  # Inductor (speed.compile=default)
    apply_overrides(config, ["train.batch_size=8", "train.gradient_accumulation_steps=8",
                             "memory.gradient_checkpointing=true"])  # fmt: skip
    cfg = bench.speed_config(config, batches=1)
    flops = epoch_flops(cfg, "sd15")
    predicted = bench.time_model_per_image(cfg, "sd15", flops)
    # the H100's measured row (2026-11-26): 0.350 and 0.982 s per image
    assert predicted["sampling"] == pytest.approx(0.350, rel=0.15)
    assert predicted["training"] == pytest.approx(0.982, rel=0.15)
    report = bench.SpeedReport(
        arch="sd15", device="NVIDIA H100 80GB HBM3", settings={}, images=8,
        seconds={"sampling": 8 * 0.350, "reward": 0.03, "training": 8 * 0.982, "epoch": 10.7},
        warmup_seconds=290.0, flops=flops, peak_tflops=989.4, peak_reserved_bytes=None,
        predicted=predicted,
    )  # fmt: skip
    ratio = 0.350 / predicted["sampling"]
    assert f"(measured over predicted: {ratio:.2f}, " in report.to_text()
    assert report.to_dict()["time_model"] == predicted


def test_a_runs_warmed_epoch_is_checked_against_the_time_model(monkeypatch):
    """After its first warmed epoch a GPU run prints its seconds beside the time model's
    (what `--vram` ranked by): the H100's measured micro-batch-8 rows read near 1, eager
    and Inductor's (the preset's)."""
    from lowvram_ddpo.speed import time_model

    monkeypatch.setattr(time_model, "this_gpu", lambda: time_model.Gpu.listed("H100", 989.4))
    config = load_preset("incompressibility")
    apply_overrides(config, ["train.batch_size=8", "train.gradient_accumulation_steps=8",
                             "memory.gradient_checkpointing=true", "model.name=sd15"])  # fmt: skip
    config.sample.batches_per_epoch = 1
    line = time_model.check_line(
        config, {"seconds_sampling": 8 * 0.350, "seconds_training": 8 * 0.982}
    )
    assert line.startswith("time model check on H100: sampling 2.8 s against ")
    ratios = [float(part.split("(")[1].split(")")[0]) for part in line.split(";")]
    assert all(0.85 < r < 1.15 for r in ratios) and "please report the line" in line
    config.speed.compile = "off"
    eager = time_model.check_line(
        config, {"seconds_sampling": 8 * 0.535, "seconds_training": 8 * 1.924}
    )
    ratios = [float(part.split("(")[1].split(")")[0]) for part in eager.split(";")]
    assert all(0.85 < r < 1.15 for r in ratios)


def _profiled_pocket_speed(tmp_path: Path, epochs: int) -> tuple[dict, str]:
    """A tiny pocket `bench speed --epochs N --profile FILE`: its report and the table."""
    table = tmp_path / "profile.txt"
    result = runner.invoke(
        app,
        ["bench", "speed", "--preset", "pocket-incompressibility", "--batches", "1",
         "--set", "sample.num_steps=2", "--set", "sample.batch_size=2",
         "--set", "train.batch_size=2", "--set", "train.gradient_accumulation_steps=1",
         "--epochs", str(epochs), "--profile", str(table), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), table.read_text()


def test_bench_speed_profiles_its_last_epoch_into_a_file(tmp_path):
    """`bench speed --profile FILE`: the last epoch's operators by time on the device and
    on the host (where a GPU session sees what an epoch spends outside the UNet)."""
    report, text = _profiled_pocket_speed(tmp_path, epochs=2)
    assert any("ran under the profiler" in note for note in report["notes"])
    assert text.startswith("operators' self time: ") and "by time on the host" in text
    assert "by time on the device" in text
    assert "aten::conv2d" in text  # the UNet's convolutions, among the epoch's operators
    kinds = text.splitlines()[0].split("by kind (ms): ")[1]  # the summary line first
    assert "convolution" in kinds and "matmul" in kinds, kinds
    in_all = float(text.split(" ms in all")[0].split(": ")[1])
    by_kind = sum(float(part.rsplit(" ", 1)[1]) for part in kinds.split(", "))
    assert in_all == pytest.approx(by_kind, rel=0.01, abs=0.1)  # each op's time once
    assert len(report["timed_epoch_seconds"]) == 1  # two epochs: the profiled one is timed


def test_bench_speed_keeps_a_profiled_epoch_out_of_its_timing_when_another_is_timed(tmp_path):
    """`--epochs 3 --profile FILE`: warm-up, a timed epoch, then the profiled one, whose
    seconds (the profiler's overhead in them) stay out of the rates: one GPU call pays the
    compile once for both the speed and where it goes."""
    report, text = _profiled_pocket_speed(tmp_path, epochs=3)
    assert any("outside the timing" in note for note in report["notes"])
    assert len(report["timed_epoch_seconds"]) == 1
    assert report["seconds"]["epoch"] == pytest.approx(report["timed_epoch_seconds"][0])
    assert text.startswith("operators' self time: ")


def test_the_session_summary_puts_each_row_beside_the_reference():
    """benchmarks/session_summary.py, the GPU session's last lines, on the H200's own
    results of 2026-11-27: the side-by-side call's row reads 2.88x the reference's
    samples/s (0.797 against 1 / (0.7915 + 2.8228)), the other call (no reference run)
    gives no ratio; a row with several timed epochs gives their spread too."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from session_summary import reference_rate, summary_lines
    finally:
        sys.path.pop(0)

    results = Path(__file__).resolve().parents[1] / "benchmarks/results/h200-2026-11-27"

    def rows(call: int) -> list[dict]:
        return [json.loads(line) for line in (results / f"call{call}-results.jsonl").open()]

    side_by_side = rows(1)
    assert reference_rate(side_by_side) == pytest.approx(1 / (0.7915 + 2.8228))
    lines = summary_lines(side_by_side)
    (row,) = [line for line in lines if line.startswith("vram7-default")]
    assert "0.797 img/s = 2.88x the reference  compile default" in row
    assert "peak reserved/allocated 5.20/4.67 GiB" in row
    assert any("reference default: sampling 0.7915 training 2.8228" in line for line in lines)
    later = rows(2)
    assert reference_rate(later) is None
    assert not any("the reference" in line for line in summary_lines(later))
    assert "mb8-ckpt-default         skipped (GPU_SESSION_SKIP)" in summary_lines(later)
    spread = dict(later[2], result={**later[2]["result"], "images_per_second_range": [0.8, 0.85]})
    (line,) = summary_lines([side_by_side[0], spread])[1:]
    assert "0.843 (0.800-0.850) img/s = 3.05x the reference (2.89-3.07)" in line
    # a UNet profile's row (H100, 2026-11-27: cut at its cap after its JSON line)
    profiled = results.parent / "h100-2026-11-27-equal/call2-results.jsonl"
    (line,) = summary_lines([json.loads(next(iter(profiled.open())))])
    assert line.startswith("profile-graphs           exit 124   90 s  profile cudagraphs:")
    assert "sampling 82.06 ms, 2733 kernels in 72.69 ms" in line and "10.2 GiB" in line
