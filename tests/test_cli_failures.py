"""What a user meets when things go wrong, or when a request does not fit: one line,
nothing lost, and numbers that agree with each other."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _assert_clean_error, _run

from lowvram_ddpo.config import load_preset, set_samples_per_epoch, validate
from lowvram_ddpo.epoch_metrics import TrainingTotals
from lowvram_ddpo.models import load_pipeline
from lowvram_ddpo.preflight import resolution_note, unknown_words_note
from lowvram_ddpo.prompts import load_prompts


def _train(tiny_preset, run_dir, *extra: str):  # noqa: ANN001, ANN202
    return _run(
        "train", "--preset", str(tiny_preset), "--output", str(run_dir), "--steps", "3",
        "--no-progress", *extra,
    )  # fmt: skip


def test_an_unwritable_run_folder_is_refused_before_any_model_loads(tiny_preset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _train(tiny_preset, blocker / "run", "--model", str(tmp_path / "no-such-model"))
    _assert_clean_error(result, f"cannot write to the run folder {blocker / 'run'}")
    assert "--output" in result.output


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(tiny_preset, tmp_path, monkeypatch):
    import lowvram_ddpo.checkpoint as checkpoint

    real_save, calls = checkpoint.save_file, []

    def save_until_the_disk_fills(*args, **kwargs):  # noqa: ANN202
        calls.append(args)
        if len(calls) > 1:  # the first checkpoint fits, the second does not
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_until_the_disk_fills)
    run_dir = tmp_path / "run"
    result = _train(tiny_preset, run_dir, "--epochs", "3")
    _assert_clean_error(result, "could not save the checkpoint of epoch 2")
    assert "No space left on device" in result.output and f"--resume {run_dir}" in result.output
    latest = json.loads((run_dir / "latest.json").read_text())
    assert latest == {"checkpoint": "checkpoints/epoch-0001", "epochs_done": 1}
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch-0001"]  # no .tmp
    kept = load_file(run_dir / "checkpoints/epoch-0001/pytorch_lora_weights.safetensors")
    exported = load_file(run_dir / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(kept[k], exported[k]) for k in kept)


def test_fewer_samples_per_epoch_than_one_optimiser_step_shrinks_the_step():
    config = load_preset("incompressibility")  # one optimiser step: 1 x 64 samples
    note = set_samples_per_epoch(config, 16)
    t = config.train
    assert (t.batch_size, t.gradient_accumulation_steps) == (1, 16)
    assert "64 samples" in note and "now 16 (1 x 16), 1 optimiser step(s) per epoch" in note
    validate(config)
    config = load_preset("incompressibility")
    assert "2 optimiser step(s)" in set_samples_per_epoch(config, 96)
    assert config.train.gradient_accumulation_steps == 48
    assert set_samples_per_epoch(load_preset("incompressibility"), 128) == ""


def test_epochs_are_counted_the_same_way_everywhere(tiny_preset, tmp_path):
    run_dir = tmp_path / "run"
    first = _train(tiny_preset, run_dir, "--epochs", "1", "--samples-per-epoch", "8")
    assert first.exit_code == 0, first.output
    assert "now 8 (8 x 1)" in first.output  # the tiny preset's step is 16 samples
    if not torch.cuda.is_available():  # the preset it extends fits itself to a CUDA card
        assert "memory.vram = auto: no CUDA GPU here, the settings as written" in first.output
    assert "epoch 1/1: reward" in first.output and "kl n/a  clipfrac n/a" in first.output
    metrics = json.loads((run_dir / "metrics.jsonl").read_text())
    assert metrics["epoch"] == 1 and metrics["approx_kl"] is None and metrics["clipfrac"] is None

    nothing_left = _run("train", "--resume", str(run_dir))
    _assert_clean_error(nothing_left, "has already trained 1 of 1 epochs: nothing to do")
    resumed = _run("train", "--resume", str(run_dir), "--epochs", "2", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert f"resumed {run_dir} after epoch 1 of 2 (epoch-0001): next is epoch 2" in resumed.output
    # no new fit: what the card has free now could change the base model's precision
    assert "resuming with the settings the run trained with" in resumed.output
    assert "epoch 2/2: reward" in resumed.output
    assert (run_dir / "checkpoints/epoch-0002").is_dir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_zero_epochs_says_that_no_lora_was_written(tiny_preset, tmp_path):
    run_dir = tmp_path / "run"
    result = _train(tiny_preset, run_dir, "--epochs", "0")
    assert result.exit_code == 0, result.output
    assert "no epoch was trained, so no LoRA was written" in result.output
    assert "LoRA in" not in result.output
    assert (run_dir / "grids" / "epoch-0000.png").is_file()


def test_kl_and_clip_fraction_count_only_after_the_policy_moved():
    totals = TrainingTotals()
    totals.add_micro_step(torch.tensor(1.0), {"approx_kl": torch.tensor(0.0)})
    totals.add_optimizer_step(math.nan)  # skipped: the policy has not moved
    totals.add_micro_step(torch.tensor(3.0), {"approx_kl": torch.tensor(0.0)})
    assert totals.means()["approx_kl"] is None
    totals.add_optimizer_step(2.0)
    totals.add_micro_step(torch.tensor(5.0), {"approx_kl": torch.tensor(4e-6)})
    means = totals.means()
    assert means["approx_kl"] == pytest.approx(4e-6) and means["clipfrac"] is None
    assert means["loss"] == 3.0 and means["grad_norm"] == 2.0
    assert (means["optimizer_steps"], means["micro_steps"]) == (1, 3)


def test_the_pocket_model_warns_about_a_foreign_size_and_foreign_words():
    pipe = load_pipeline("pocket")
    note = resolution_note(pipe, 512, "pocket")
    assert "trained at 32 px" in note and "--resolution 32" in note
    assert resolution_note(pipe, 32, "pocket") is None
    words = unknown_words_note(pipe, ["a cat", "a small red circle on a blue background"], "pocket")
    assert "cat" in words and "circle" not in words and "prompts.source=pocket_world" in words
    assert unknown_words_note(pipe, load_prompts("pocket_world"), "pocket") is None


def test_a_bad_resolution_is_advised_in_the_model_s_own_size():
    pocket = _run("train", "--preset", "pocket-incompressibility", "--resolution", "33")
    _assert_clean_error(pocket, "pocket was trained at 32 px")
    sd15 = _run("train", "--preset", "incompressibility", "--resolution", "33")
    _assert_clean_error(sd15, "was trained at 512 px")


def test_lora_targets_that_match_no_layer_are_one_line():
    """``model.lora_targets`` naming no layer of the model was peft's traceback."""
    from tiny import build_tiny_pipeline

    from lowvram_ddpo.errors import UserError
    from lowvram_ddpo.models import attach_lora

    with pytest.raises(UserError, match="lora_targets nosuch matches no layer .* e.g. to_q"):
        attach_lora(build_tiny_pipeline().unet, 2, 2.0, ["nosuch"])
