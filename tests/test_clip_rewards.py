"""PickScore and CLIPScore on a tiny random CLIP built here (no download): the score is
CLIP's own logit (PickScore) or 2.5 x its clipped cosine (CLIPScore), batch-independent,
differentiable, and its real model shapes are estimated offline."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_tokenizer
from transformers import CLIPConfig, CLIPModel

from lowvram_ddpo.architectures import building_on
from lowvram_ddpo.config import RewardConfig, load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import estimate_memory
from lowvram_ddpo.rewards import build_reward
from lowvram_ddpo.rewards.clip_image import clip_preprocess
from lowvram_ddpo.rewards.clip_score import CLIP_H_14, KNOWN_SHAPES

PROMPTS = ["a red circle", "a blue square", "a cat riding a bike"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reward(name: str, folder, batch_size: int = 8):  # noqa: ANN202
    config = RewardConfig(
        name=name, clip_model=str(folder), pickscore_model=str(folder), pickscore_tokenizer="",
        batch_size=batch_size,
    )  # fmt: skip
    return build_reward(name, config)


def _clip_logits(folder, images: torch.Tensor) -> torch.Tensor:
    """transformers' own CLIP forward: logit_scale.exp() * cos, image i against prompt i."""
    clip = CLIPModel.from_pretrained(folder).eval()
    tokens = tiny_tokenizer()(
        PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    pixels = clip_preprocess(images, 32)
    with torch.no_grad():
        out = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                   pixel_values=pixels)  # fmt: skip
    return out.logits_per_image.diagonal(), clip.logit_scale.exp()


def test_pickscore_is_clips_own_logit_and_clipscore_its_clipped_cosine(clip_dir):
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    logits, scale = _clip_logits(clip_dir, images)
    pick = _reward("pickscore", clip_dir)(images, PROMPTS)
    assert torch.allclose(pick, logits, atol=1e-5), (pick, logits)
    clipscore = _reward("clipscore", clip_dir)(images, PROMPTS)
    assert torch.allclose(clipscore, 2.5 * (logits / scale).clamp(min=0), atol=1e-5)
    assert (pick != pick[0]).any()  # the prompts matter


def test_scores_do_not_depend_on_the_scoring_batch_and_are_differentiable(clip_dir):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    one = _reward("pickscore", clip_dir, batch_size=1)(images, PROMPTS)
    three = _reward("pickscore", clip_dir, batch_size=3)(images, PROMPTS)
    assert torch.allclose(one, three, atol=1e-5)
    reward = _reward("pickscore", clip_dir)
    images.requires_grad_(True)
    reward.score(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.module.parameters())


def test_a_missing_clip_model_is_one_line_saying_what_to_do(tmp_path):
    config = RewardConfig(name="pickscore", pickscore_model=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="set reward.pickscore_model to a folder"):
        build_reward("pickscore", config)


def test_the_real_models_are_estimated_offline_with_their_published_sizes():
    sizes = {}
    for name, shape in KNOWN_SHAPES.items():
        with building_on("meta", torch.float16):
            sizes[name] = sum(p.numel() for p in CLIPModel(CLIPConfig(**shape)).parameters())
    assert 985e6 < sizes["yuvalkirstain/PickScore_v1"] < 988e6  # CLIP ViT-H/14: 986 M
    assert 427e6 < sizes["openai/clip-vit-large-patch14"] < 429e6  # CLIP ViT-L/14: 428 M
    assert CLIP_H_14["projection_dim"] == 1024
    config = load_preset("incompressibility")
    config.reward.name = "pickscore"
    report = estimate_memory(config, "sd15")
    held = report.phase("reward").held["reward model"]
    assert 1.9e9 < held < 2.0e9  # fp16 weights, on the card only while scoring


def test_a_mix_is_the_weighted_sum_and_logs_each_part(clip_dir):
    config = RewardConfig(
        name="mix", mix={"jpeg_incompressibility": 1.0, "pickscore": 0.5},
        pickscore_model=str(clip_dir), pickscore_tokenizer="", batch_size=2,
    )  # fmt: skip
    mix = build_reward("mix", config)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    jpeg = build_reward("jpeg_incompressibility")(images, PROMPTS)
    pick = _reward("pickscore", clip_dir)(images, PROMPTS)
    assert torch.allclose(mix(images, PROMPTS), jpeg + 0.5 * pick, atol=1e-4)
    logged = mix.extra_metrics()
    assert logged["reward_pickscore_mean"] == pytest.approx(pick.mean().item(), abs=1e-4)
    assert logged["reward_jpeg_incompressibility_mean"] == pytest.approx(jpeg.mean().item())
    assert mix.extra_metrics()["reward_pickscore_mean"] == 0  # reset after each read


def test_a_mix_in_a_preset_round_trips_and_bad_mixes_are_refused(tmp_path):
    from lowvram_ddpo.config import dump_toml, load_config_file, validate
    from lowvram_ddpo.rewards import reward_with_random_weights

    preset = tmp_path / "mine.toml"
    preset.write_text(
        'extends = "incompressibility"\n[reward]\nname = "mix"\n'
        "mix = {aesthetic = 1.0, pickscore = 0.5}\n"
    )
    config = load_preset(str(preset))
    validate(config)
    assert config.reward.mix == {"aesthetic": 1.0, "pickscore": 0.5}
    (tmp_path / "config.toml").write_text(dump_toml(config))
    assert load_config_file(tmp_path / "config.toml").reward.mix == config.reward.mix
    # both networks are estimated: the mix's weights are the sum of its parts'
    mixed = reward_with_random_weights(config.reward, torch.float16).device_bytes()
    parts = [
        reward_with_random_weights(RewardConfig(name=n), torch.float16).device_bytes()
        for n in ("aesthetic", "pickscore")
    ]
    assert mixed == sum(parts) and min(parts) > 0
    config.reward.mix = {"pickscore": 1.0, "nope": 1.0}
    with pytest.raises(UserError, match="reward.mix names unknown rewards"):
        validate(config)
    config.reward.mix = {}
    with pytest.raises(UserError, match="needs reward.mix"):
        validate(config)
