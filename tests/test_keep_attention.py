"""memory.keep_attention: gradient checkpointing that keeps self-attention's outputs for the
backward instead of computing them again. The same gradients, bitwise; the attention
kernel not run again; its bytes counted by the estimate, its saving by the time model."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils._python_dispatch import TorchDispatchMode

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.checkpointing import (
    attention_keeping_checkpoint,
    enable_checkpointing,
    torch_checkpoint,
)
from lowvram_ddpo.memory.estimate import estimate_memory
from lowvram_ddpo.memory.units import GB
from lowvram_ddpo.models import load_pipeline
from lowvram_ddpo.speed.flops import _SelfAttentionCounted, epoch_flops

CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class _AttentionCalls(TorchDispatchMode):
    """Counts the CPU attention kernel's calls, self- and cross-attention apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"self": 0, "cross": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is CPU_ATTENTION:
            self.calls["self" if args[0].shape[-2] == args[1].shape[-2] else "cross"] += 1
        return func(*args, **(kwargs or {}))


def _gradients_and_backward_calls(
    unet: torch.nn.Module,
    checkpoint,  # noqa: ANN001
    backend: str = "",
) -> tuple[list, dict]:
    unet = copy.deepcopy(unet).requires_grad_(True).train()
    enable_checkpointing(unet, checkpoint)
    if backend:
        unet.compile(backend=backend)
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, 4, size, size, generator=generator)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    out = unet(x, torch.tensor([500, 500]), encoder_hidden_states=text).sample
    backward = _AttentionCalls()
    with backward if not backend else contextlib.nullcontext():  # compiled: kernels unseen
        out.square().mean().backward()
    return [p.grad for p in unet.parameters()], backward.calls


def test_kept_self_attention_gives_the_same_gradients_without_running_it_again():
    unet = load_pipeline("pocket").unet
    plain, recomputed = _gradients_and_backward_calls(unet, torch_checkpoint)
    kept, kept_calls = _gradients_and_backward_calls(unet, attention_keeping_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(plain, kept, strict=True))
    # the backward recomputed every checkpointed layer's attention; now the cross-attention only
    assert recomputed["self"] > 0 and recomputed["cross"] > 0
    assert kept_calls == {"self": 0, "cross": recomputed["cross"]}


def test_the_estimate_holds_the_kept_outputs_and_the_time_model_saves_their_arithmetic():
    """SD 1.5 at 512 px, micro-batch 8 (16 latents with guidance): each self-attention's
    fp16 output and fp32 log-sum-exp, 383 MB summed over the 16 layers; the peak comes
    during the backward, after some of them are freed, so it grows by less."""
    config = load_preset("incompressibility")
    apply_overrides(
        config,
        ["train.batch_size=8", "train.gradient_accumulation_steps=8",
         "memory.gradient_checkpointing=true", "memory.vram=off",
         "speed.compile=off"],  # the meta count: Inductor's factor skips kept attention
    )  # fmt: skip
    kept = copy.deepcopy(config)
    kept.memory.keep_attention = True
    tokens = {4096: (320, 5), 1024: (640, 5), 256: (1280, 5), 64: (1280, 1)}  # width, layers
    summed = sum(16 * n * (width * 2 + 8 * 4) * layers for n, (width, layers) in tokens.items())
    assert summed == pytest.approx(383e6, rel=0.01)
    before = estimate_memory(config, "sd15").phase("training").peak_allocated
    after = estimate_memory(kept, "sd15").phase("training").peak_allocated
    assert 0.5 * summed < after - before <= summed
    flops = epoch_flops(config, "sd15", count_backward=False)
    share = flops.recomputation.self_attention[0]
    assert 0.12 < share < 0.20  # of what full checkpointing recomputes
    saved = flops.recomputed_per_step(config.memory, 50) - flops.recomputed_per_step(
        kept.memory, 50
    )
    assert saved == pytest.approx(share * flops.sampling_per_image / 50)


def test_self_attention_flops_are_counted_and_cross_attention_is_not():
    added = []
    q, k_text = torch.zeros(2, 8, 64, 40), torch.zeros(2, 8, 77, 40)
    wide_v = torch.zeros(2, 8, 64, 24)
    with _SelfAttentionCounted(added.append):
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, k_text, k_text)
        F.scaled_dot_product_attention(query=q, key=q, value=wide_v)
    rows = 2 * 8 * 64
    # QK^T (query width) and the weighted sum (value width)
    assert added == [2 * rows * 64 * (40 + 40), 2 * rows * 64 * (40 + 24)]


def test_the_fit_keeps_attention_where_memory_allows_and_a_held_setting_stays():
    from lowvram_ddpo.memory.fit import fit_to_vram, held_fields

    config = load_preset("incompressibility")
    apply_overrides(config, ["memory.optimizer=adamw"])
    roomy = fit_to_vram(config, "sd15", 8 * GB)
    tight = fit_to_vram(config, "sd15", 7 * GB)
    assert roomy.config.memory.gradient_checkpointing and roomy.config.memory.keep_attention
    assert tight.config.memory.gradient_checkpointing and not tight.config.memory.keep_attention
    held = ["memory.gradient_checkpointing=true"]
    apply_overrides(config, held)
    as_set = fit_to_vram(config, "sd15", 8 * GB, held_fields(held))
    assert not as_set.config.memory.keep_attention  # checkpointing set by hand: as written
    # refusing it holds only itself: the fit still checkpoints, keeping nothing
    assert held_fields(["memory.keep_attention=false"]) == {"memory.keep_attention"}
    preset = load_preset("incompressibility")
    apply_overrides(preset, ["memory.optimizer=adamw", "memory.keep_attention=false"])
    refused = fit_to_vram(preset, "sd15", 8 * GB, held_fields(["memory.keep_attention=false"]))
    assert refused.config.memory.gradient_checkpointing
    assert not refused.config.memory.keep_attention
    # eager, the fit does not offer it (its policy is Python per op: a host cost unmodelled)
    eager = load_preset("incompressibility")
    apply_overrides(eager, ["memory.optimizer=adamw", "speed.compile=off"])
    assert not fit_to_vram(eager, "sd15", 12 * GB).config.memory.keep_attention


def test_a_held_keep_attention_fits_a_model_without_levels():
    """SD 3.5's transformer has no resolution levels: the time model credits kept attention
    nothing there, yet a user's own setting is a candidate (it was refused as unfittable)."""
    from lowvram_ddpo.memory.fit import fit_to_vram, held_fields

    held = ["memory.keep_attention=true"]
    config = load_preset("sd35m-grpo-incompressibility")
    apply_overrides(config, held)
    fit = fit_to_vram(config, "sd35m", 24 * GB, held_fields(held))
    assert fit.config.memory.gradient_checkpointing and fit.config.memory.keep_attention


def test_keep_attention_needs_checkpointing_and_pytorchs_attention():
    config = load_preset("pocket-incompressibility")
    apply_overrides(config, ["memory.keep_attention=true"])
    with pytest.raises(UserError, match="set memory.gradient_checkpointing = true with it"):
        validate(config)
    apply_overrides(config, ["memory.gradient_checkpointing=true", "memory.attention=xformers"])
    with pytest.raises(UserError, match="with memory.attention=xformers it would keep nothing"):
        validate(config)


def test_a_run_that_keeps_attention_trains_to_the_same_weights(tiny_preset, tmp_path):
    """The trainer's micro-steps with memory.keep_attention: one epoch's LoRA weights equal
    bitwise those of checkpointing alone (same samples, same gradients)."""
    from lowvram_ddpo.trainer import Trainer

    weights, calls = {}, {}
    for keep in (False, True):
        config = load_preset(str(tiny_preset))
        apply_overrides(
            config,
            ["run.epochs=1", "memory.gradient_checkpointing=true", f"memory.keep_attention={keep}"],
        )
        validate(config)
        trainer = Trainer(config, tmp_path / f"keep-{keep}")
        trainer.setup()
        samples, signal, _ = trainer.sample_and_score(epoch=0)
        initial = [p.detach().clone() for p in trainer.params]
        with _AttentionCalls() as training:
            trainer.train_on(samples, signal, 0)
        weights[keep] = [p.detach().clone() for p in trainer.params]
        calls[keep] = training.calls
    assert any(not torch.equal(a, b) for a, b in zip(initial, weights[True], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True], strict=True))
    # the trainer's backward computed self-attention again only without it kept: half the calls
    assert calls[True]["self"] > 0 and calls[False]["self"] == 2 * calls[True]["self"]
    assert calls[False]["cross"] == calls[True]["cross"]
    assert "--set memory.keep_attention=false " in _oom_advice(trainer)


def _oom_advice(trainer) -> str:  # noqa: ANN001
    trainer.phase = "training"
    return trainer.out_of_memory_message(0)


def test_compiled_with_the_attention_kept_the_gradients_are_eagers(fresh_dynamo):
    """Under torch.compile the kept outputs are the graph's (dynamo passes the policy to
    the partitioner): aot_eager runs the same kernels, so bitwise; in one graph, and
    without the in-place reminder torch prints for any checkpoint given a policy."""
    from torch._dynamo.utils import counters

    unet = load_pipeline("pocket").unet
    eager, _ = _gradients_and_backward_calls(unet, attention_keeping_checkpoint)
    counters.clear()  # what earlier tests in this process compiled
    grads, _ = _gradients_and_backward_calls(unet, attention_keeping_checkpoint, "aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(eager, grads, strict=True))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # torch says it once per process, whoever compiled first: the filter is tested alone
    wrap = logging.getLogger("torch._higher_order_ops.wrap")
    reminder = "Detected that context_fn is passed to torch.utils.checkpoint under torch.compile."
    other = "something else"
    assert [wrap.filter(_record(m)) for m in (reminder, other)] == [False, True]


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("torch._higher_order_ops.wrap", 30, "", 0, message, None, None)


def test_the_keep_attention_table_shows_the_fit_and_its_twin():
    """benchmarks/keep_attention_fit.py: the 8 GB fit keeps attention and is predicted
    faster than its twin without, which holds less."""
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import keep_attention_fit

    line = keep_attention_fit.row("incompressibility", "8GB")
    assert "attention kept" in line
    (kept_s, kept_gb), (twin_s, twin_gb) = re.findall(r"(\d+) s, ([\d.]+) GB", line)
    assert int(kept_s) < int(twin_s) and float(kept_gb) > float(twin_gb)
    assert keep_attention_fit.share_line("incompressibility").startswith(
        "self-attention, of what full checkpointing recomputes (sd15): 0 level(s) out: 16."
    )
