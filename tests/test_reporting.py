"""Watching a run: metric tags, durations, the time left and the metrics chart."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from PIL import Image

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.reporting.metrics_chart import COLOURS, write_metrics_chart
from lowvram_ddpo.reporting.progress import TimeLeft, format_duration
from lowvram_ddpo.reporting.trackers import loggable, metric_tag, resolve_log_with


def test_metrics_are_grouped_and_only_numbers_are_logged():
    assert metric_tag("reward_mean") == "reward/mean"
    assert metric_tag("eval_reward_mean") == "eval/reward_mean"
    assert metric_tag("seconds_training") == "time/training"
    assert metric_tag("phase_seconds_decode") == "time/device_decode"
    assert metric_tag("peak_reserved_bytes") == "memory/reserved_bytes"
    # a phase's start beside its peak, not written over it
    start, peak = (
        metric_tag("start_reserved_bytes_decode"),
        metric_tag("peak_reserved_bytes_decode"),
    )
    assert start == "memory/start_reserved_bytes_decode" != peak
    assert metric_tag("approx_kl") == "train/approx_kl"
    logged = loggable({"epoch": 3, "loss": 0.5, "skipped_steps": 0, "flag": True, "name": "x"})
    assert logged == {"train/loss": 0.5, "train/skipped_steps": 0.0}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (45, "45 s"),
        (720, "12 min"),
        (7800, "2 h 10 min"),
        (7200, "2 h"),
        (3 * 86400 + 4 * 3600, "3 d 4 h"),
    ],
)
def test_durations_read_as_people_say_them(seconds, text):
    assert format_duration(seconds) == text


def test_time_left_comes_from_this_process_s_epochs():
    eta = TimeLeft(total_epochs=100, first_epoch=2)  # resumed after epoch 2
    eta.started = time.perf_counter() - 60  # 3 epochs in a minute: 20 s each
    assert eta.after(5) == "~32 min left"  # 95 epochs x 20 s
    assert eta.after(2) == "" and eta.after(100) == ""


def test_time_left_leaves_the_warm_up_epoch_out_once_another_ended(monkeypatch):
    """A first epoch of 100 s (compiling, CUDA graphs recorded), then 10 s each: after the
    first the estimate can only use it (a compiled run says it is high); from the second
    on, the later epochs alone."""
    import lowvram_ddpo.reporting.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    eta = TimeLeft(total_epochs=100, first_epoch=0)
    clock[0] += 100
    assert eta.after(1) == "~2 h 45 min left"  # 99 x 100 s
    clock[0] += 10
    assert eta.after(2) == "~16 min left"  # 98 x 10 s
    clock[0] += 10
    assert eta.after(3) == "~16 min left"  # 97 x 10 s
    compiled = TimeLeft(total_epochs=100, first_epoch=0, compiles=True)
    clock[0] += 100
    assert compiled.after(1) == "~2 h 45 min left at most: this epoch compiled"
    clock[0] += 10
    assert compiled.after(2) == "~16 min left"


def _pixels_of(image: Image.Image, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.asarray(image) == rgb).all(axis=-1).sum())


def test_the_metrics_chart_draws_reward_eval_and_the_base_model(tmp_path):
    history = [
        {"epoch": 1, "reward_mean": 1.0},
        {"epoch": 2, "reward_mean": 2.0, "eval_reward_mean": 2.5},
        {"epoch": 3, "reward_mean": math.nan},  # a diverged epoch leaves a gap, no error
        {"epoch": 4, "reward_mean": 3.0, "eval_reward_mean": 3.5},
    ]
    path = tmp_path / "metrics.png"
    write_metrics_chart(history, path, "jpeg_incompressibility")
    image = Image.open(path).convert("RGB")
    for name in ("reward", "eval reward", "base model"):
        assert _pixels_of(image, COLOURS[name]) > 50, name
    write_metrics_chart(history[:1], path, "jpeg")  # one epoch: a point and the baseline
    assert _pixels_of(Image.open(path).convert("RGB"), COLOURS["reward"]) > 10


def test_a_tracker_asked_for_by_name_must_be_installed(monkeypatch):
    monkeypatch.setattr("lowvram_ddpo.reporting.trackers.installed", lambda name: False)
    assert (
        resolve_log_with("auto")[0] == "none"
        and "pip install tensorboard" in resolve_log_with("auto")[1]
    )
    with pytest.raises(UserError, match="pip install wandb"):
        resolve_log_with("wandb")
    with pytest.raises(UserError, match="unknown --log-with"):
        resolve_log_with("mlflow")
