"""Data parallel on 2 CPU processes (gloo): rewards are gathered and every process trains on
advantages equal to a single-process computation over all the gathered rewards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lowvram_ddpo.algorithms import PerPromptStatTracker, clip_advantages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gather_rewards_and_share_advantages(tiny_preset, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "lowvram_ddpo.cli",
        "train",
        "--preset",
        str(tiny_preset),
        "--output",
        str(run_dir),
        "--epochs",
        "1",
        "--no-progress",
        "--set",
        "run.log_rollouts=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    folder = run_dir / "rollouts"
    ranks = [json.loads((folder / f"epoch-0001-rank{r}.json").read_text()) for r in (0, 1)]
    gathered = json.loads((folder / "epoch-0001-gathered.json").read_text())
    per_process = 8 * 2  # sample.batch_size x sample.batches_per_epoch of the tiny preset
    assert all(len(r["rewards"]) == per_process for r in ranks)
    assert gathered["rewards"] == pytest.approx(ranks[0]["rewards"] + ranks[1]["rewards"])
    assert gathered["prompts"] == ranks[0]["prompts"] + ranks[1]["prompts"]
    assert ranks[0]["rewards"] != ranks[1]["rewards"], "both processes drew the same samples"

    # the advantages a single process computes over all the gathered rewards
    tracker = PerPromptStatTracker(buffer_size=16, min_count=4)
    expected = clip_advantages(
        tracker.update(gathered["prompts"], torch.tensor(gathered["rewards"])), 5.0
    )
    assert gathered["signal"] == pytest.approx(expected.tolist(), abs=1e-5)
    local = ranks[0]["signal"] + ranks[1]["signal"]
    assert local == pytest.approx(expected.tolist(), abs=1e-5)

    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["samples"] == 2 * per_process
