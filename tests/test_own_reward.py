"""A reward of the user's own: `--reward my_reward.py:score` or `module:score`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowvram_ddpo.cli import app
from lowvram_ddpo.config import (
    apply_overrides,
    dump_toml,
    load_config_file,
    load_preset,
    validate,
)
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards import build_reward

BRIGHTNESS = """
import json, os

CALLS = os.environ.get("OWN_REWARD_LOG")


def brightness(images, prompts):
    scores = images.mean(dim=(1, 2, 3))
    if CALLS:
        with open(CALLS, "a") as f:
            f.write(json.dumps({"dtype": str(images.dtype), "shape": list(images.shape),
                                "prompts": prompts, "scores": scores.tolist()}) + "\\n")
    return scores


class Counted:
    built = 0

    def __init__(self):
        Counted.built += 1

    def __call__(self, images, prompts):
        return [float(len(p)) for p in prompts]


def broken(images, prompts):
    return images.mean() / undefined_name


def one_number(images, prompts):
    return images.mean()


class WithAModel:
    def __init__(self):
        import torch

        self.weight = torch.nn.Parameter(torch.ones(3))  # gradients on, as a loaded model's

    def __call__(self, images, prompts):
        return images.mean(dim=(2, 3)) @ self.weight


NOT_A_FUNCTION = 3
"""


def _write(folder: Path, text: str, name: str = "my_reward.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_function_in_a_file_scores_fp32_images(tmp_path):
    path = _write(tmp_path, BRIGHTNESS)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = build_reward(f"{path}:brightness")
    scores = reward(images.half(), ["a", "b", "c"])
    assert torch.allclose(scores, images.half().float().mean(dim=(1, 2, 3)))
    assert scores.dtype == torch.float32  # the user's function sees fp32 images


def test_a_class_is_built_once_and_a_module_imports_by_name(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write(tmp_path, BRIGHTNESS, "shop_rewards.py")
    reward = build_reward("shop_rewards:Counted")
    assert reward(torch.zeros(2, 3, 4, 4), ["ab", "abcd"]).tolist() == [2.0, 4.0]
    reward(torch.zeros(1, 3, 4, 4), ["x"])
    import shop_rewards

    assert shop_rewards.Counted.built == 1


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("{folder}/missing.py:score", "no file .*missing.py"),
        ("{folder}/my_reward.py:nothing", "has no 'nothing' .*brightness"),
        ("{folder}/my_reward.py:NOT_A_FUNCTION", "is a int, not a function"),
        ("{folder}/r.v2.py:score", "could not be imported: r.v2.py line 1: ZeroDivisionError"),
        ("{folder}/syntax.py:score", "could not be imported: syntax.py line 2: SyntaxError"),
        ("no_such_module_here:score", "no module no_such_module_here"),
    ],
)
def test_a_broken_reward_is_one_line(tmp_path, name, message):
    _write(tmp_path, BRIGHTNESS)
    _write(tmp_path, "x = 1\ndef score(:\n", "syntax.py")
    _write(tmp_path, "x = 1 / 0\n", "r.v2.py")
    with pytest.raises(UserError, match=message) as caught:
        build_reward(name.format(folder=tmp_path))
    assert "\n" not in str(caught.value)


def test_a_model_in_the_reward_gives_plain_numbers_and_a_scalar_is_refused(tmp_path):
    path = _write(tmp_path, BRIGHTNESS)
    scores = build_reward(f"{path}:WithAModel")(torch.ones(2, 3, 4, 4), ["a", "b"])
    assert scores.tolist() == [3.0, 3.0] and not scores.requires_grad
    with pytest.raises(UserError, match="returned 1 values for 2 images"):
        build_reward(f"{path}:one_number")(torch.ones(2, 3, 4, 4), ["a", "b"])


def test_an_error_inside_the_function_names_its_line(tmp_path):
    path = _write(tmp_path, BRIGHTNESS)
    reward = build_reward(f"{path}:broken")
    line = BRIGHTNESS.splitlines().index("    return images.mean() / undefined_name") + 1
    with pytest.raises(UserError, match=f"failed: my_reward.py line {line}: NameError"):
        reward(torch.zeros(1, 3, 4, 4), ["x"])


def test_the_config_accepts_own_rewards_and_keeps_them_through_its_file(tmp_path):
    path = _write(tmp_path, BRIGHTNESS)
    config = load_preset("pocket-incompressibility")
    apply_overrides(config, ["reward.name=mix", f'reward.mix={{"{path}:brightness" = 1.0}}'])
    validate(config)
    from lowvram_ddpo.config import reward_label

    assert reward_label(f"{path}:brightness") == "brightness"  # its metric's name
    saved = tmp_path / "config.toml"
    saved.write_text(dump_toml(config))  # the run folder's copy, read again on --resume
    assert load_config_file(saved).reward.mix == {f"{path}:brightness": 1.0}
    config = load_preset("pocket-incompressibility")
    config.reward.name = f"{tmp_path}/absent.py:score"
    with pytest.raises(UserError, match="no file .*absent.py"):
        validate(config)
    with pytest.raises(UserError, match="unknown reward 'nope': use one of .*FILE.py:FUNCTION"):
        build_reward("nope")


def test_train_scores_with_the_users_reward(tmp_path, tiny_preset, monkeypatch):
    """Through the command line: the user's function gets the epoch's images (fp32, in
    [0, 1]) and prompts, and its scores are the rewards the run logs."""
    path = _write(tmp_path, BRIGHTNESS)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("OWN_REWARD_LOG", str(calls))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--preset", str(tiny_preset), "--output", str(run), "--epochs", "1",
              "--reward", "my_reward.py:brightness", "--log-with", "none", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # saved absolute: a resume from another folder still finds the file
    assert load_config_file(run / "config.toml").reward.name == f"{path.resolve()}:brightness"
    logged = [json.loads(line) for line in calls.read_text().splitlines()]
    scores = [s for call in logged for s in call["scores"]]
    assert {call["dtype"] for call in logged} == {"torch.float32"}
    assert all(0 <= s <= 1 for s in scores) and len(scores) >= 16
    [metrics] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the epoch's two sampling batches of 8; the grids' calls (base model, end) score 2
    epoch = [s for call in logged if len(call["scores"]) == 8 for s in call["scores"]]
    assert len(epoch) == 16 and {p for call in logged for p in call["prompts"]} <= {
        "a cat",
        "a dog",
    }
    assert metrics["reward_mean"] == pytest.approx(sum(epoch) / 16, rel=1e-5)


def test_a_broken_reward_file_fails_before_the_model_loads(tmp_path, tiny_preset, monkeypatch):
    from lowvram_ddpo.trainer import Trainer

    path = _write(tmp_path, "import no_such_package_anywhere\n", "bad_reward.py")

    def load_models(self, dtype):  # noqa: ANN001, ANN202
        raise AssertionError("the model was loaded before the reward was checked")

    monkeypatch.setattr(Trainer, "load_models", load_models)
    result = CliRunner().invoke(
        app, ["train", "--preset", str(tiny_preset), "--output", str(tmp_path / "run"),
              "--reward", f"{path}:score", "--log-with", "none"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "bad_reward.py line 1: ModuleNotFoundError" in result.output
    assert "Traceback" not in result.output


def test_sample_checks_its_reward_before_loading(tmp_path, monkeypatch):
    import lowvram_ddpo.sampling as sampling

    def load_pipeline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the reward was checked")

    monkeypatch.setattr(sampling, "load_pipeline", load_pipeline)
    path = _write(tmp_path, BRIGHTNESS)
    for reward, message in [
        ("nope", "unknown reward 'nope'"),
        (f"{path}:nothing", "has no 'nothing'"),
    ]:
        result = CliRunner().invoke(
            app, ["sample", "--prompts", "a cat", "--reward", reward, "--no-progress"]
        )
        assert result.exit_code == 2 and message in result.output, result.output


def test_the_shipped_examples_score_what_they_say():
    """examples/my_reward.py, the file the README points users to."""
    examples = Path(__file__).parents[1] / "examples" / "my_reward.py"
    grey = torch.full((1, 3, 8, 8), 0.5)
    vivid = torch.zeros(1, 3, 8, 8)
    vivid[0, 0, :, :4] = 1.0  # half red, half blue
    vivid[0, 2, :, 4:] = 1.0
    images, prompts = torch.cat([grey, vivid]), ["a", "a much longer prompt"]
    assert build_reward(f"{examples}:brightness")(images, prompts).tolist() == pytest.approx(
        [0.5, 1 / 3]
    )
    colorful = build_reward(f"{examples}:colorfulness")(images, prompts)
    assert colorful[0] == pytest.approx(0.0, abs=1e-6) and colorful[1] > 0.5
    darker_long = build_reward(f"{examples}:PromptLength")(torch.cat([grey, grey]), prompts)
    assert darker_long[0] > darker_long[1]
