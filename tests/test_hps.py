"""HPS v2 on a tiny random CLIP built here and saved in open_clip's layout (no download):
the converted model computes what open_clip computes on the original weights (an in-test
reference forward), the score is transformers' cosine, images are letterboxed, and the
real model's shape is estimated offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from tiny import assert_batch_independent_and_differentiable, tiny_tokenizer
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from lowvram_ddpo.config import RewardConfig, load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import estimate_memory
from lowvram_ddpo.rewards import build_reward, reward_with_random_weights
from lowvram_ddpo.rewards.clip_image import CLIP_MEAN, CLIP_STD, clip_preprocess
from lowvram_ddpo.rewards.hps import HpsReward, openclip_to_transformers

PROMPTS = ["a red circle", "a blue square", "a cat riding a bike"]
TEXT_LAYERS, VISION_LAYERS, HEADS, PATCH = 2, 3, 4, 8
TINY = dict(  # different widths and layer counts per tower, so mix-ups do not fit
    text_config=dict(
        vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=16, hidden_act="gelu",
        bos_token_id=512, eos_token_id=513, pad_token_id=513,  # tiny_tokenizer's ids
    ),
    vision_config=dict(
        hidden_size=48, intermediate_size=53, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=HEADS, image_size=32, patch_size=PATCH, hidden_act="gelu",
    ),
    projection_dim=16,
)  # fmt: skip


class TinyHps(HpsReward):
    shape = TINY


def to_openclip(clip: CLIPModel) -> dict[str, Tensor]:
    """The model under open_clip's names (what HPS_v2*_compressed.pt holds): q, k, v packed
    into in_proj, projections stored for ``x @ proj``."""
    sd = clip.state_dict()
    text_layers = clip.config.text_config.num_hidden_layers
    vision_layers = clip.config.vision_config.num_hidden_layers
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
    }
    towers = [
        ("transformer.resblocks", "text_model.encoder.layers", text_layers),
        ("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
    ]
    renames = [
        ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
    ]  # fmt: skip
    for openclip, hf, layers in towers:
        for i in range(layers):
            a, b = f"{openclip}.{i}.", f"{hf}.{i}."
            for p in ("weight", "bias"):
                packed = [sd[f"{b}self_attn.{n}_proj.{p}"] for n in "qkv"]
                out[f"{a}attn.in_proj_{p}"] = torch.cat(packed)
                for old, new in renames:
                    out[f"{a}{old}.{p}"] = sd[f"{b}{new}.{p}"]
    packed_away = 4 * (text_layers + vision_layers)  # q, k, v (weight, bias) -> in_proj
    assert len(out) == len([k for k in sd if "position_ids" not in k]) - packed_away
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(**TINY)).half().float().eval()  # the file is fp16: same values
    clip.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    state = {k: v.half() for k, v in to_openclip(clip).items()}
    torch.save({"state_dict": state}, folder / "HPS_tiny.pt")
    return folder, clip, {k: v.float() for k, v in state.items()}


def _reward(folder, weights=None, batch_size: int = 8) -> HpsReward:
    config = RewardConfig(
        name="hpsv2", hps_weights=str(weights or folder / "HPS_tiny.pt"),
        hps_tokenizer=str(folder / "tokenizer"), batch_size=batch_size,
    )  # fmt: skip
    return TinyHps(config, torch.float32)


def _tokens(ids_only: bool = False):  # noqa: ANN202
    tokens = tiny_tokenizer()(
        PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    return tokens.input_ids if ids_only else tokens


def test_the_score_is_transformers_cosine_for_every_form_of_the_weights(hps_files, tmp_path):
    folder, clip, state = hps_files
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    tokens = _tokens()
    with torch.no_grad():
        out = clip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=clip_preprocess(images, 32, fit="pad"),
        )
    expected = out.logits_per_image.diagonal() / clip.logit_scale.exp()
    hps = _reward(folder)(images, PROMPTS)
    assert torch.allclose(hps, expected, atol=1e-5), (hps, expected)
    assert (hps != hps[0]).any()  # the prompts matter
    # a bare state dict with DistributedDataParallel's prefix, and a transformers folder
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pt")
    config = RewardConfig(name="hpsv2", hps_weights=str(folder / "hf"), hps_tokenizer="")
    for other in (_reward(folder, tmp_path / "bare.pt"), build_reward("hpsv2", config)):
        assert torch.allclose(other(images, PROMPTS), expected, atol=1e-5)


def openclip_features(sd: dict[str, Tensor], pixels: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip's CLIP forward, written from its model.py/transformer.py on the original
    names: nn.MultiheadAttention on in_proj, pre-LN blocks, a causal text mask, the text
    pooled at its argmax token, ``@ proj``."""

    def tower(x: Tensor, prefix: str, layers: int, mask: Tensor | None = None) -> Tensor:
        width = x.shape[-1]
        for i in range(layers):
            p = f"{prefix}.{i}."
            attn = nn.MultiheadAttention(width, HEADS, batch_first=True)
            names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            attn.load_state_dict({n: sd[f"{p}attn.{n}"] for n in names})
            h = F.layer_norm(x, (width,), sd[f"{p}ln_1.weight"], sd[f"{p}ln_1.bias"])
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (width,), sd[f"{p}ln_2.weight"], sd[f"{p}ln_2.bias"])
            h = F.gelu(F.linear(h, sd[f"{p}mlp.c_fc.weight"], sd[f"{p}mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[f"{p}mlp.c_proj.weight"], sd[f"{p}mlp.c_proj.bias"])
        return x

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(len(x), 1, -1)
    x = norm(torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"], "visual.ln_pre")
    x = tower(x, "visual.transformer.resblocks", VISION_LAYERS)
    image = norm(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    n = ids.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    x = norm(tower(x, "transformer.resblocks", TEXT_LAYERS, causal), "ln_final")
    text = x[torch.arange(len(x)), ids.argmax(dim=-1)] @ sd["text_projection"]
    return image, text


def test_the_converted_model_computes_what_open_clip_computes_on_the_original_weights(hps_files):
    folder, _, state = hps_files
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ids = _tokens(ids_only=True)
    with torch.no_grad():
        image, text = openclip_features(state, clip_preprocess(images, 32, fit="pad"), ids)
        agreement = _reward(folder).module
        ours_image, ours_text = agreement.embed_images(images), agreement.embed_text(PROMPTS)
    torch.testing.assert_close(ours_image, image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_text, text, atol=1e-5, rtol=1e-4)
    assert image.abs().mean() > 0.1 and (text[0] - text[1]).abs().max() > 1e-3  # not trivial


def _letterbox(images: Tensor, size: int) -> Tensor:
    """open_clip's ResizeMaxSize (longer side to ``size``, centred on a black square) and
    Normalize, one image at a time."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    out = []
    for image in images:
        h, w = image.shape[-2:]
        new_h, new_w = round(h * size / max(h, w)), round(w * size / max(h, w))
        small = F.interpolate(image[None], (new_h, new_w), mode="bicubic", antialias=True)[0]
        canvas = torch.zeros(3, size, size)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas[:, top : top + new_h, left : left + new_w] = small
        out.append((canvas - mean) / std)
    return torch.stack(out)


def test_pad_letterboxes_a_non_square_image_on_black_and_leaves_a_square_one_alone():
    generator = torch.Generator().manual_seed(5)
    wide = torch.rand(2, 3, 21, 40, generator=generator)  # 21 x 0.8 = 16.8 -> 17 rows
    padded = clip_preprocess(wide, 32, fit="pad")
    torch.testing.assert_close(padded, _letterbox(wide, 32))
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    bars = torch.cat([padded[..., :7, :], padded[..., 24:, :]], dim=-2)  # 7 above, 8 below
    assert torch.equal(bars, black.expand_as(bars))
    assert not torch.isclose(padded[..., 7:24, :], black).all(dim=1).any()  # image rows
    assert not torch.allclose(padded, clip_preprocess(wide, 32))  # a centre crop differs
    tall = wide.transpose(-1, -2)  # 40 x 21: the bars are left (7) and right (8)
    torch.testing.assert_close(clip_preprocess(tall, 32, fit="pad"), padded.transpose(-1, -2))
    square = torch.rand(2, 3, 48, 48, generator=generator)
    assert torch.equal(clip_preprocess(square, 32, fit="pad"), clip_preprocess(square, 32))


def test_scores_do_not_depend_on_the_scoring_batch_and_are_differentiable(hps_files):
    folder = hps_files[0]
    assert_batch_independent_and_differentiable(
        lambda batch: _reward(folder, batch_size=batch), PROMPTS, seed=2
    )


def test_the_real_model_is_estimated_offline_with_its_published_size():
    reward = reward_with_random_weights(RewardConfig(name="hpsv2"), torch.float16)
    assert reward.device.type == "meta"
    assert sum(p.numel() for p in reward.module.parameters()) == 986_109_441  # ViT-H-14
    # HPS_v2.1_compressed.pt's names at these shapes (686 tensors, fp16: the file's 1.97 GB)
    # convert exactly onto the model's weights
    original = to_openclip(reward.module.clip)
    assert len(original) == 686 and original["visual.proj"].shape == (1280, 1024)
    assert original["visual.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    converted = {k: v.shape for k, v in openclip_to_transformers(original).items()}
    model = reward.module.clip.state_dict()
    assert converted == {k: v.shape for k, v in model.items() if "position_ids" not in k}
    assert reward.module.fit == "pad"
    config = load_preset("incompressibility")
    config.reward.name = "hpsv2"
    held = estimate_memory(config, "sd15").phase("reward").held["reward model"]
    assert 1.9e9 < held < 2.0e9  # fp16 weights, on the card only while scoring


def test_missing_or_wrong_weights_are_one_line_saying_what_to_do(hps_files, tmp_path):
    folder = hps_files[0]
    for weights, advice in [
        (str(tmp_path / "nope.pt"), "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
        ("nobody/nothing/HPS.pt", "offline, download it first"),  # not in the hub cache
    ]:
        config = RewardConfig(name="hpsv2", hps_weights=weights)
        with pytest.raises(UserError, match="set reward.hps_weights to the local file") as err:
            build_reward("hpsv2", config)
        assert advice in str(err.value) and "\n" not in str(err.value)
    state = torch.load(folder / "HPS_tiny.pt", weights_only=True)["state_dict"]
    del state["visual.ln_post.bias"]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(UserError, match="vision_model.post_layernorm.bias missing"):
        _reward(folder, tmp_path / "short.pt")
    torch.save(state | {"visual.attnpool.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="'visual.attnpool.weight' is not an open_clip"):
        _reward(folder, tmp_path / "odd.pt")
    run = load_preset("incompressibility")
    run.reward.name, run.reward.hps_weights = "hpsv2", ""
    with pytest.raises(UserError, match="reward.hps_weights must not be empty"):
        validate(run)
