"""The command line: listings, clear one-line errors, train and sample on the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from lowvram_ddpo.cli import app
from lowvram_ddpo.config import list_presets, load_config_file

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _assert_clean_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_presets_lists_every_preset_with_its_description():
    result = _run("presets")
    assert result.exit_code == 0
    for name, description in list_presets().items():
        assert name in result.output and description in result.output


def test_rewards_lists_every_reward_in_aligned_columns():
    from lowvram_ddpo.config import REWARD_NAMES
    from lowvram_ddpo.rewards import available_rewards

    result = _run("rewards")
    listing, own = result.output.split("\n\n")
    lines = listing.splitlines()
    assert [line.split()[0] for line in lines] == list(available_rewards())
    assert "FILE.py:FUNCTION" in own  # and how to bring one's own
    assert tuple(available_rewards()) == REWARD_NAMES  # what the help texts list
    width = max(map(len, REWARD_NAMES))
    assert all(line[width : width + 2] == "  " and line[width + 2] != " " for line in lines)


def test_help_and_version():
    from lowvram_ddpo import __version__

    assert _run("--version").output.strip() == f"lowvram-ddpo {__version__}"
    main = _run("-h")
    assert main.exit_code == 0 and "RLCM" in main.output and "export" in main.output
    assert "RLCM" in _run("train", "-h").output
    sample = _run("sample", "--help").output
    assert "Denoising steps [default: the run's, else 4 for" in sample  # no markup gap
    assert "prompt_alignment" in sample and "[default: 0 1 2 3]" in sample
    assert _run("bench", "-h").exit_code == 0


def test_importing_the_models_prints_no_torchvision_notice():
    """transformers' notice that CLIP's image processor falls back to PIL without
    torchvision used to be printed by every command."""
    code = "import lowvram_ddpo.cli; from diffusers import StableDiffusionPipeline"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--preset", "incompressibility", "--model", "./no/such/folder"], "does not exist"),
        (["--preset", "incompressibility", "--set", "train.nope=1"], "unknown config key"),
        (["--preset", "incompressibility", "--resolution", "500"], "multiple of 8"),
        (["--preset", "incompressibility", "--algorithm", "ppo"], "unknown algorithm"),
        (["--preset", "incompressibility", "--samples-per-epoch", "12"], "not a multiple"),
        (["--preset", "incompressibility", "--vram", "8XB"], "is not a card size: write it"),
        (["--model", "x"], "choose a preset"),
        (["--resume", "/no/such/run"], "not a run folder"),
    ],
)
def test_bad_input_gets_a_one_line_error(args, message):
    _assert_clean_error(_run("train", *args), message)


def test_unreachable_hub_model_says_what_to_do(tiny_preset, tmp_path):
    result = _run(
        "train",
        "--preset",
        str(tiny_preset),
        "--model",
        "no-such-org/no-such-model",
        "--output",
        str(tmp_path / "run"),
    )
    _assert_clean_error(result, "could not load model 'no-such-org/no-such-model'")
    assert "--model" in result.output


def test_vram_fit_of_an_unreachable_model_uses_its_likely_shape(tmp_path):
    """Without the model's configs, --vram estimates the shape its name suggests (SD 1.5
    here: SDXL's fit, seconds per candidate on the meta device, is test_sdxl's) and the run
    then stops on the loading error, which says what to do."""
    from lowvram_ddpo.architectures import default_architecture

    assert default_architecture("no-such-org/no-such-sdxl-model") == "sdxl"
    result = _run(
        "train",
        "--preset",
        "incompressibility",
        "--model",
        "no-such-org/no-such-model",
        "--vram",
        "6GB",
        "--output",
        str(tmp_path / "run"),
    )
    assert "--vram 6GB: " in result.output
    assert "memory.gradient_checkpointing False -> True" in result.output
    _assert_clean_error(result, "could not load model 'no-such-org/no-such-model'")


def test_folder_without_model_index_is_refused(tiny_preset, tmp_path):
    result = _run("train", "--preset", str(tiny_preset), "--model", str(tmp_path))
    _assert_clean_error(result, "not a diffusers pipeline folder")


def test_train_from_a_saved_folder_then_sample_before_and_after(tiny_preset, tmp_path):
    run_dir = tmp_path / "run"
    result = _run(
        "train",
        "--preset",
        str(tiny_preset),
        "--output",
        str(run_dir),
        "--epochs",
        "1",
        "--steps",
        "3",
        "--samples-per-epoch",
        "16",
        "--lr",
        "1e-2",
        "--seed",
        "7",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "Loading pipeline components" not in result.output  # --no-progress: no bars
    config = load_config_file(run_dir / "config.toml")
    assert (config.sample.num_steps, config.train.learning_rate, config.run.seed) == (3, 1e-2, 7)
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()

    again = _run("train", "--preset", str(tiny_preset), "--output", str(run_dir))
    _assert_clean_error(again, f"--resume {run_dir}")
    changed = _run("train", "--resume", str(run_dir), "--lr", "1")
    _assert_clean_error(changed, "--lr cannot change a run being resumed")

    grid = tmp_path / "grid.png"
    result = _run(
        "sample",
        "--lora",
        str(run_dir),
        "--prompts",
        "a cat",
        "--prompts",
        "a dog",
        "--seeds",
        "0",
        "--seeds",
        "1",
        "--grid",
        str(grid),
        "--reward",
        "jpeg_incompressibility",
    )
    assert result.exit_code == 0, result.output
    image = Image.open(grid)
    assert image.width > 2 * 2 * 32  # two panels of two seeds
    assert "[base model] a cat:" in result.output
    assert "[with LoRA run (epoch 1)] a dog:" in result.output
    assert result.output.count("mean reward") == 2

    # no prompts: the run's own grid prompts, said
    result = _run("sample", "--lora", str(run_dir), "--seeds", "0", "--grid", str(grid))
    assert result.exit_code == 0, result.output
    assert f"the run's grid prompts ({'; '.join(config.run.grid_prompts)})" in result.output
    assert Image.open(grid).height > len(config.run.grid_prompts) * 32  # a row each
    _assert_clean_error(_run("sample", "--seeds", "0"), "or --lora a run folder")


def test_sample_without_a_lora_at_the_path_is_refused(tmp_path):
    result = _run("sample", "--lora", str(tmp_path), "--prompts", "a cat", "--model", str(tmp_path))
    _assert_clean_error(result, "no LoRA at")
    # without prompts too: the path is what is wrong, not the missing prompts
    _assert_clean_error(_run("sample", "--lora", str(tmp_path / "typo")), "no LoRA at")
    # a bad value is refused before any model loads (none is at --model)
    result = _run("sample", "--prompts", "a cat", "--eta", "0", "--model", str(tmp_path))
    _assert_clean_error(result, "--eta must be above 0 (got 0.0)")


def test_held_out_prompts_are_scored_during_training_and_by_sample(tiny_preset, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a cat riding a bike\na fox playing chess\n")
    run_dir = tmp_path / "run"
    result = _run(
        "train",
        "--preset",
        str(tiny_preset),
        "--output",
        str(run_dir),
        "--epochs",
        "2",
        "--set",
        f"prompts.eval_source='{held_out}'",
        "--set",
        "run.eval_every=2",
        "--no-progress",
        "--log-with",
        "tensorboard",
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval_reward_mean" not in metrics[0]  # every 2 epochs
    assert metrics[1]["eval_reward_mean"] > 0  # JPEG kB of the held-out images
    assert re.search(r"epoch 1/2: .* ~\d+ s left", result.output), result.output
    assert Image.open(run_dir / "metrics.png").size == (720, 440)

    # TensorBoard holds the same numbers, at step = epoch, and the grids
    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"images": 0})
    events.Reload()
    rewards = events.Scalars("reward/mean")
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([m["reward_mean"] for m in metrics])
    assert [e.step for e in events.Scalars("eval/reward_mean")] == [2]
    assert {"train/loss", "time/epoch", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("grids/progress")] == [0]
    assert [e.step for e in events.Images("grids/before_after")] == [2]

    grid = tmp_path / "grid.png"
    result = _run(
        "sample",
        "--lora",
        str(run_dir),
        "--prompt-set",
        str(held_out),
        "--seeds",
        "0",
        "--grid",
        str(grid),
        "--reward",
        "jpeg_incompressibility",
    )
    assert result.exit_code == 0, result.output
    assert "a fox playing chess" in result.output and grid.is_file()


def test_eval_every_without_prompts_is_refused(tiny_preset):
    result = _run("train", "--preset", str(tiny_preset), "--set", "run.eval_every=5")
    assert result.exit_code == 2 and "needs prompts.eval_source" in result.output
