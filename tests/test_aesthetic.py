"""The LAION aesthetic reward on a tiny random CLIP vision tower built here (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lowvram_ddpo.config import RewardConfig, apply_overrides, load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards import build_reward
from lowvram_ddpo.rewards.aesthetic import AestheticReward, fold_linear_layers, load_head_state
from lowvram_ddpo.trainer import train

EMBED = 16


def laion_mlp(width: int = EMBED) -> nn.Sequential:
    """LAION's improved-aesthetic-predictor layout, narrower (768 in the real one)."""
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory) -> tuple[Path, Path, nn.Sequential]:
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=EMBED,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "clip")
    mlp = laion_mlp()
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, folder / "head.pth")
    return folder / "clip", folder / "head.pth", mlp


def _reward(scorer_files, batch_size: int = 3) -> AestheticReward:
    clip, head, _ = scorer_files
    config = RewardConfig(
        name="aesthetic", clip_model=str(clip), head_weights=str(head), batch_size=batch_size
    )
    return build_reward("aesthetic", config)


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(1))


def test_folded_head_equals_the_layered_mlp_in_eval_mode(scorer_files):
    _, head, mlp = scorer_files
    weight, bias = fold_linear_layers(load_head_state(str(head)))
    x = torch.randn(7, EMBED)
    mlp.eval()  # dropout off, as at inference
    assert weight.shape == (1, EMBED)
    torch.testing.assert_close(x @ weight.T + bias, mlp(x), rtol=1e-4, atol=1e-5)


def test_scores_have_the_right_shape_and_do_not_depend_on_the_batch_size(scorer_files):
    images = _images()
    scores = _reward(scorer_files, batch_size=3)(images, ["a cat"] * 5)
    one_by_one = _reward(scorer_files, batch_size=1)(images, ["a cat"] * 5)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and scores.std() > 0
    torch.testing.assert_close(scores, one_by_one, rtol=1e-4, atol=1e-5)


def test_no_gradient_leaks_but_the_score_is_differentiable(scorer_files):
    reward = _reward(scorer_files)
    assert not any(p.requires_grad for p in reward.module.parameters())
    images = _images(2).requires_grad_(True)
    assert not reward(images, ["x", "y"]).requires_grad  # the training loop's call
    reward.score(images, ["x", "y"]).sum().backward()  # reward backprop, later
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_preprocessing_matches_clips_image_processor(scorer_files):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    images = _images(2)
    pil = [
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        for im in images
    ]
    expected = processor(images=pil, return_tensors="pt").pixel_values
    ours = _reward(scorer_files).module.preprocess((images * 255).round() / 255)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.02  # PIL's and torch's bicubic differ slightly


def test_head_files_load_from_safetensors_and_refuse_pickled_objects(scorer_files, tmp_path):
    _, head, _ = scorer_files
    state = load_head_state(str(head))
    save_file(state, tmp_path / "head.safetensors")
    torch.testing.assert_close(load_head_state(str(tmp_path / "head.safetensors")), state)
    torch.save({"layers.0.weight": torch.zeros(1), "extra": Path("x")}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="not unpickled"):
        load_head_state(str(tmp_path / "evil.pth"))
    with pytest.raises(UserError, match="not found"):
        load_head_state("./missing.pth")
    with pytest.raises(UserError, match="layers.0.weight"):
        fold_linear_layers({"w": torch.zeros(1)})


def test_training_with_the_aesthetic_reward_writes_its_metrics(
    scorer_files, tiny_preset, tmp_path, monkeypatch
):
    from lowvram_ddpo.trainer import Trainer

    on_device: dict[str, set[str]] = {}
    original_train_on, original_score = Trainer.train_on, Trainer.score

    def spy_train_on(self, *args):  # noqa: ANN001, ANN002, ANN202
        on_device["training"] = set(self.offloader.resident)
        return original_train_on(self, *args)

    def spy_score(self, *args):  # noqa: ANN001, ANN002, ANN202
        result = original_score(self, *args)
        on_device["after scoring"] = set(self.offloader.resident)
        return result

    monkeypatch.setattr(Trainer, "train_on", spy_train_on)
    monkeypatch.setattr(Trainer, "score", spy_score)
    clip, head, _ = scorer_files
    config = load_preset(str(tiny_preset))
    apply_overrides(
        config,
        [
            "reward.name='aesthetic'",
            f"reward.clip_model='{clip}'",
            f"reward.head_weights='{head}'",
            "run.epochs=2",
        ],
    )
    validate(config)
    history = train(config, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert all(np.isfinite(m["reward_mean"]) and m["reward_std"] > 0 for m in history)
    assert on_device["training"] == on_device["after scoring"] == {"unet"}  # scorer offloaded


def test_the_measured_bench_builds_the_scorer_with_random_weights(scorer_files):
    """`bench memory --preset aesthetic` on a GPU (here its CPU path): the CLIP scorer is
    built from its config with random weights, nothing loaded, and a reward phase runs."""
    from lowvram_ddpo.config import apply_overrides, load_preset
    from lowvram_ddpo.memory.measure import measure_run
    from lowvram_ddpo.rewards import reward_with_random_weights

    clip, _, _ = scorer_files
    config = load_preset("pocket-incompressibility")
    overrides = ["reward.name='aesthetic'", f"reward.clip_model='{clip}'", "reward.batch_size=4"]
    apply_overrides(config, [*overrides, "reward.head_weights='/nonexistent/head.pth'"])
    stand_in = reward_with_random_weights(config.reward, torch.float32, "cpu")
    images = torch.rand(3, 3, 32, 32)
    scores = stand_in(images, ["a cat"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    report = measure_run(config, "pocket")  # would fail if it tried to read the head file
    reward = next(p for p in report.phases if p.name == "reward")
    assert reward.seconds and reward.seconds > 0
