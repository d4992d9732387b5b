"""End to end on the tiny pipeline: learning, the saved LoRA, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.trainer import train


def _config(preset: Path, *overrides: str):
    config = load_preset(str(preset))
    apply_overrides(config, list(overrides))
    validate(config)
    return config


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# 64 samples per epoch, one optimiser step per epoch: enough signal for a visible rise
LEARNING = (
    "sample.batch_size=16",
    "sample.batches_per_epoch=4",
    "train.batch_size=16",
    "train.gradient_accumulation_steps=4",
    "run.epochs=8",
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    from conftest import TINY_PRESET

    folder = tmp_path_factory.mktemp("trained")
    preset = folder / "tiny.toml"
    preset.write_text(TINY_PRESET.format(model=tiny_model_dir))
    run_dir = folder / "run"
    history = train(_config(preset, *LEARNING, "run.grid_every=4"), run_dir)
    return run_dir, history


def test_ddpo_is_raises_the_incompressibility_reward(trained_run):
    run_dir, history = trained_run
    rewards = [m["reward_mean"] for m in history]
    first, last = rewards[0], sum(rewards[-3:]) / 3
    assert last > first + 0.03, rewards
    # the run folder holds what a user needs
    assert [m["epoch"] for m in _metrics(run_dir)] == list(range(1, 9))
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "config.toml").is_file()
    for grid in ("epoch-0000.png", "epoch-0004.png", "before_after.png"):
        assert (run_dir / "grids" / grid).is_file()
    for key in (
        "reward_std",
        "approx_kl",
        "clipfrac",
        "loss",
        "seconds_sampling",
        "seconds_training",
        "seconds_reward",
    ):
        assert key in history[0]
    # sampled and trained 16 at a time: re-scored before each epoch's first update, the
    # log-probs are the sampled ones (the run measures its own replay)
    assert all(m["replay_rms"] == 0.0 and m["replay_clipfrac"] == 0.0 for m in history)


def _pipeline_images(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        ["a cat", "a dog"],
        num_inference_steps=4,
        generator=generator,
        output_type="pt",
        height=32,
        width=32,
    ).images


def test_saved_lora_loads_with_diffusers_and_changes_images(trained_run, tiny_model_dir):
    run_dir, _ = trained_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _pipeline_images(pipe)
    pipe.load_lora_weights(run_dir)
    after = _pipeline_images(pipe)
    assert (after - before).abs().mean() > 1e-3
    # the adapter covers the attention projections of the UNet, nothing else
    state = load_file(run_dir / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("unet.") for k in state)
    assert any("to_q" in k for k in state) and any("to_out" in k for k in state)


@pytest.mark.parametrize("algorithm", ["ddpo-sf", "rwr", "sparse-rwr"])
def test_every_algorithm_trains_the_adapter(tiny_preset, tmp_path, algorithm):
    run_dir = tmp_path / algorithm
    history = train(_config(tiny_preset, f"train.algorithm={algorithm}", "run.epochs=1"), run_dir)
    assert history[0]["optimizer_steps"] == 1
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert history[0]["replay_clipfrac"] is None  # nothing clipped: no replay to report
    trained = load_file(run_dir / "checkpoints/epoch-0001/adapter_model.safetensors")
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero


@pytest.mark.parametrize(("fraction", "micro_steps"), [(1.0, 8), (0.5, 4)])
def test_timestep_fraction_trains_a_share_of_the_steps(
    tiny_preset, tmp_path, fraction, micro_steps
):
    # 16 samples in micro-batches of 8, 4 denoising steps: 2 x 4 micro-steps at fraction 1
    config = _config(tiny_preset, f"train.timestep_fraction={fraction}", "run.epochs=1")
    history = train(config, tmp_path / "run")
    assert history[0]["micro_steps"] == micro_steps
    assert history[0]["optimizer_steps"] == 1  # accumulation spans the trained timesteps


def _train_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowvram_ddpo.cli", "train", "--no-progress", *args]


def test_resume_after_a_kill_repeats_no_epoch_and_loses_none(tiny_preset, tmp_path):
    """Kill a 6-epoch run once it has checkpointed 2 epochs, resume it, and compare with a
    run that was never interrupted: same epochs logged once each, same adapter weights."""
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cli("--preset", str(tiny_preset), "--output", str(killed), "--epochs", "6"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.is_file() and json.loads(latest.read_text())["epochs_done"] >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the training process ended before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = json.loads(latest.read_text())["epochs_done"]
    assert 2 <= done_at_kill < 6, "the kill came too late to test anything"

    resumed = subprocess.run(
        _train_cli("--resume", str(killed)), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {killed} after epoch {done_at_kill}" in resumed.stderr + resumed.stdout

    straight = tmp_path / "straight"
    train(_config(tiny_preset, "run.epochs=6", f"run.output={straight}"), straight)
    assert [m["epoch"] for m in _metrics(killed)] == list(range(1, 7))
    for a, b in zip(_metrics(killed), _metrics(straight), strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    final = "checkpoints/epoch-0006/adapter_model.safetensors"
    killed_state, straight_state = load_file(killed / final), load_file(straight / final)
    for key, value in straight_state.items():
        assert torch.allclose(killed_state[key], value, atol=1e-6), key


def test_full_fine_tuning_trains_every_weight_resumes_and_samples(
    tiny_preset, tiny_model_dir, tmp_path
):
    from typer.testing import CliRunner

    from lowvram_ddpo.cli import app

    run_dir = tmp_path / "full"
    train(_config(tiny_preset, "model.lora_rank=0", "run.epochs=1"), run_dir)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").state_dict()
    tuned = UNet2DConditionModel.from_pretrained(run_dir / "unet").state_dict()
    changed = {name for name, value in tuned.items() if not torch.equal(value, base[name])}
    assert "conv_in.weight" in changed  # not an attention projection: no LoRA here
    assert any("resnets" in name for name in changed)
    assert not list(run_dir.glob("*.safetensors"))  # no LoRA file pretending to be one

    resumed = train(_config(tiny_preset, "model.lora_rank=0", "run.epochs=2"), run_dir, True)
    assert [m["epoch"] for m in resumed] == [2]
    assert (run_dir / "checkpoints/epoch-0002/unet/config.json").is_file()

    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--lora",
            str(run_dir),
            "--prompts",
            "a cat",
            "--seeds",
            "0",
            "--grid",
            str(grid),
        ],
    )
    assert result.exit_code == 0, result.output
    assert grid.is_file()


_SCORED_IN: list[tuple[str, int]] = []
"""(thread, images) of every scoring call."""


def _register_probe_rewards() -> None:
    import threading

    from lowvram_ddpo.rewards import register_reward
    from lowvram_ddpo.rewards.jpeg import JpegIncompressibility

    @register_reward("test_thread_probe", "JPEG size, recording the thread that scored it")
    class Probe(JpegIncompressibility):
        def __call__(self, images, prompts):  # noqa: ANN001, ANN204
            _SCORED_IN.append((threading.current_thread().name, len(prompts)))
            return super().__call__(images, prompts)

    @register_reward("test_nan_reward", "always NaN")
    class NanReward(JpegIncompressibility):
        def __call__(self, images, prompts):  # noqa: ANN001, ANN204
            return torch.full((len(prompts),), float("nan"))


def test_rewards_scored_beside_sampling_give_the_same_run(tiny_preset, tmp_path):
    _register_probe_rewards()
    histories, weights = {}, {}
    for overlap in ("on", "off"):
        _SCORED_IN.clear()
        config = _config(
            tiny_preset, "reward.name='test_thread_probe'", f"reward.overlap='{overlap}'"
        )
        histories[overlap] = train(config, tmp_path / overlap)
        weights[overlap] = load_file(tmp_path / overlap / "pytorch_lora_weights.safetensors")
        batch = config.sample.batch_size  # the grids (2 images) are scored on the main thread
        samples_in = {thread for thread, images in _SCORED_IN if images == batch}
        assert samples_in == ({"reward_0"} if overlap == "on" else {"MainThread"}), _SCORED_IN
        assert {thread for thread, images in _SCORED_IN if images != batch} == {"MainThread"}
    for key in ("reward_mean", "reward_std", "loss"):
        assert [m[key] for m in histories["on"]] == [m[key] for m in histories["off"]]
    assert all(torch.equal(weights["on"][k], weights["off"][k]) for k in weights["on"])


def test_a_failing_reward_in_the_worker_thread_stops_the_run_clearly(tiny_preset, tmp_path):
    from lowvram_ddpo.errors import UserError

    _register_probe_rewards()
    config = _config(tiny_preset, "reward.name='test_nan_reward'", "reward.overlap='on'")
    with pytest.raises(UserError, match="NaN"):
        train(config, tmp_path / "nan")


def test_grid_every_minus_one_renders_no_grid(tiny_preset, tmp_path):
    """What `bench speed` uses: the grids are not the epoch (and would compile new shapes)."""
    run_dir = tmp_path / "run"
    train(_config(tiny_preset, "run.epochs=1", "run.grid_every=-1"), run_dir)
    assert _metrics(run_dir)[0]["epoch"] == 1
    assert not list(run_dir.glob("grids/*.png"))


def test_a_run_whose_replay_misses_says_so_once_and_shows_it_each_epoch(
    tiny_preset, tmp_path, monkeypatch, capsys
):
    """Stored log-probs off by 3e-5 (as other kernels' rounding would leave them): each
    epoch measures a 3e-5 replay miss before its first update, its line shows it, and the
    run says once that the replay is not exact (0.30 of the clip range)."""
    from lowvram_ddpo.trainer import Trainer

    sample_and_score = Trainer.sample_and_score

    def rounded_apart(self, epoch):  # noqa: ANN001, ANN202
        samples, rewards, seconds = sample_and_score(self, epoch)
        samples.log_probs += 3e-5
        return samples, rewards, seconds

    monkeypatch.setattr(Trainer, "sample_and_score", rounded_apart)
    history = train(_config(tiny_preset), tmp_path / "run")
    assert [m["replay_rms"] for m in history] == [pytest.approx(3e-5, rel=0.02)] * 2
    output = capsys.readouterr().out
    assert output.count("replay 3.0e-05") == 2  # both epoch lines
    assert output.count("this epoch's replay is not exact") == 1
    assert "0.30 of the clip range" in output and "equal batches (speed.compile=off)" in output
