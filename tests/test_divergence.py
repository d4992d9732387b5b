"""Non-finite values never reach a checkpoint: a diverging run stops with one line, and
the last good checkpoint, the run's LoRA and latest.json stay valid."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _assert_clean_error, _run
from tiny import build_tiny_pipeline

from lowvram_ddpo.checkpoint import latest_checkpoint, save_checkpoint
from lowvram_ddpo.divergence import DivergenceGuard, NonFiniteTraining, all_finite
from lowvram_ddpo.models import attach_lora


def test_the_guard_skips_non_finite_steps_and_stops_after_too_many_in_a_row():
    guard = DivergenceGuard(max_skipped=3)
    assert guard.allows_step(1.5)
    assert not guard.allows_step(math.nan) and not guard.allows_step(math.inf)
    assert guard.allows_step(0.1)  # a finite step resets the run of skips
    assert not guard.allows_step(math.nan) and not guard.allows_step(math.nan)
    assert guard.take_skipped_count() == 4 and guard.take_skipped_count() == 0
    with pytest.raises(NonFiniteTraining, match="3 optimiser steps in a row"):
        guard.allows_step(math.nan)
    with pytest.raises(NonFiniteTraining, match="weights"):
        guard.check_weights([torch.ones(3), torch.tensor([1.0, math.inf])])
    assert all_finite([torch.ones(2)]) and not all_finite([torch.tensor([math.nan])])


def test_a_non_finite_adapter_is_never_written(tmp_path):
    pipe = build_tiny_pipeline()
    params = attach_lora(pipe.unet, 2, 2.0, ["to_q"])
    optimizer = torch.optim.AdamW(params)
    good = save_checkpoint(tmp_path, pipe.unet, optimizer, 1, {})
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with torch.no_grad():
        params[0][0, 0] = math.nan
    with pytest.raises(NonFiniteTraining, match="after epoch 2"):
        save_checkpoint(tmp_path, pipe.unet, optimizer, 2, {}, keep=1)
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and latest_checkpoint(tmp_path) == good


def test_a_learning_rate_far_too_high_stops_the_run_and_keeps_the_good_checkpoint(
    tmp_path, tiny_preset
):
    run_dir = tmp_path / "run"
    result = _run(
        "train", "--preset", str(tiny_preset), "--output", str(run_dir), "--lr", "1e6",
        "--epochs", "8", "--set", "run.keep_checkpoints=1", "--no-progress",
    )  # fmt: skip
    _assert_clean_error(result, "training diverged in epoch")
    assert "learning rate" in result.output and "--lr" in result.output
    assert "done:" not in result.output
    latest = json.loads((run_dir / "latest.json").read_text())
    folder = run_dir / latest["checkpoint"]
    assert str(folder) in result.output  # the message names the last good checkpoint
    saved = [run_dir / "pytorch_lora_weights.safetensors", *folder.glob("*.safetensors")]
    for path in saved:
        assert all_finite(load_file(path).values()), path
    # the metrics stop at that checkpoint's epoch: what is on disk is consistent
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["epoch"] == latest["epochs_done"]
