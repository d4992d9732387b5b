"""ImageReward on tiny random BLIP towers built here and saved in the official
ImageReward.pt layout (no download): the score is the formula on transformers' modules,
the prompt reaches it through cross-attention, padding is masked, BLIP's ViT is what
timm's computes on the original weights, and the real model's shape is estimated offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file
from tiny import assert_batch_independent_and_differentiable
from torch import Tensor
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)

from lowvram_ddpo.config import RewardConfig, load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import estimate_memory
from lowvram_ddpo.rewards import build_reward, reward_with_random_weights
from lowvram_ddpo.rewards.clip_image import clip_preprocess
from lowvram_ddpo.rewards.imagereward import (
    ImageReward,
    imagereward_head,
    split_imagereward_state,
)

PROMPTS = ["a red circle", "a blue square", "a cat riding a bike"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "blue", "square", "cat"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = WORDS + list(LETTERS) + [f"##{c}" for c in LETTERS]
LAYERS, HEADS, PATCH, EPS = 2, 4, 8, 1e-6
TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    image_size=32, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=EPS,
)  # fmt: skip
TINY_TEXT = dict(  # narrower than the vision tower, as BERT (768) is than the ViT (1024)
    vocab_size=len(VOCAB), hidden_size=24, encoder_hidden_size=32, intermediate_size=29,
    num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=40,
    hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, is_decoder=True,
    bos_token_id=2, sep_token_id=3,
)  # fmt: skip


class TinyImageReward(ImageReward):
    vision_shape = TINY_VISION
    text_shape = TINY_TEXT


VISION_RENAMES = {  # BlipVisionModel -> BLIP's ViT (timm) names, from BLIP's vit.py
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
BLOCK_RENAMES = {
    "layer_norm1": "norm1",
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _original_vision_name(key: str) -> str:
    if key in VISION_RENAMES:
        return VISION_RENAMES[key]
    index, name = key.removeprefix("encoder.layers.").split(".", 1)
    module, param = name.rsplit(".", 1)
    return f"blocks.{index}.{BLOCK_RENAMES[module]}.{param}"


def to_imagereward(vision: BlipVisionModel, text: BlipTextModel, head) -> dict[str, Tensor]:
    """The modules under ImageReward.pt's names, with the entries the score does not use
    (the position_ids buffer, BLIP's contrastive projections to 256)."""
    out = {
        f"blip.visual_encoder.{_original_vision_name(k)}": v for k, v in vision.state_dict().items()
    }
    out |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    out |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    device, positions = vision.device, text.config.max_position_embeddings
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions, device=device)[None]
    for name, tower in (("vision_proj", vision), ("text_proj", text)):
        out[f"blip.{name}.weight"] = torch.randn(256, tower.config.hidden_size, device=device)
        out[f"blip.{name}.bias"] = torch.zeros(256, device=device)
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def spread(module: torch.nn.Module) -> torch.nn.Module:
    """Unit-gain random weights: with transformers' init (std 0.02) every output sits near
    its bias, and a wrong prompt or image path would hide under the tolerance."""
    for param in module.parameters():
        if param.dim() >= 2:
            param.normal_(0, param[0].numel() ** -0.5)
    return module


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder / "bert")
    torch.manual_seed(0)
    vision = spread(BlipVisionModel(BlipVisionConfig(**TINY_VISION))).eval()
    text = spread(BlipTextModel(BlipTextConfig(**TINY_TEXT), add_pooling_layer=False)).eval()
    head = spread(imagereward_head(24)).eval()
    state = to_imagereward(vision, text, head)
    torch.save(state, folder / "ImageReward.pt")
    save_file(state, folder / "ImageReward.safetensors")
    return folder, vision, text, head, state


def _reward(folder, weights=None, batch_size: int = 8) -> ImageReward:
    config = RewardConfig(
        name="imagereward", imagereward_weights=str(weights or folder / "ImageReward.pt"),
        imagereward_tokenizer=str(folder / "bert"), batch_size=batch_size,
    )  # fmt: skip
    return TinyImageReward(config, torch.float32)


def _tokens(folder, prompts: list[str]):  # noqa: ANN202
    tokenizer = BertTokenizer.from_pretrained(folder / "bert")
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )


@torch.no_grad()
def _official_score(ir_files, images: Tensor, prompts: list[str]) -> Tensor:
    """ImageReward.score's steps on the modules: every image token attended (a mask of
    ones), the [CLS] output through the MLP, standardised."""
    folder, vision, text, head, _ = ir_files
    image = vision(pixel_values=clip_preprocess(images, 32)).last_hidden_state
    tokens = _tokens(folder, prompts)
    ones = torch.ones(image.shape[:2], dtype=torch.long)
    h = text(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        encoder_hidden_states=image,
        encoder_attention_mask=ones,
    ).last_hidden_state
    return (head(h[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_the_score_is_imagerewards_formula_on_the_loaded_modules(ir_files):
    folder = ir_files[0]
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    expected = _official_score(ir_files, images, PROMPTS)
    for weights in ("ImageReward.pt", "ImageReward.safetensors"):
        scores = _reward(folder, folder / weights)(images, PROMPTS)
        assert torch.allclose(scores, expected, atol=1e-5), (weights, scores, expected)
    assert expected.std() > 0.1  # images and prompts differ, so do the scores


def test_the_prompt_reaches_the_score_and_its_padding_does_not(ir_files):
    folder, vision, text, head, _ = ir_files
    reward = _reward(folder)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).repeat(3, 1, 1, 1)
    scores = reward(images, PROMPTS)
    assert (scores - scores[0]).abs().max() > 0.05  # one image, three prompts
    # the same prompt unpadded (no mask needed) scores the same: the pads are masked
    tokens = _tokens(folder, PROMPTS[:1])
    length = int(tokens.attention_mask.sum())
    with torch.no_grad():
        image = vision(pixel_values=clip_preprocess(images[:1], 32)).last_hidden_state
        ids = tokens.input_ids
        short = text(input_ids=ids[:, :length], encoder_hidden_states=image).last_hidden_state
        unmasked = text(input_ids=ids, encoder_hidden_states=image).last_hidden_state
    unpadded = (head(short[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(scores[:1], unpadded, atol=1e-5)
    assert not torch.allclose(short[:, 0], unmasked[:, 0], atol=1e-4)  # pads would matter


def blip_vit(sd: dict[str, Tensor], pixels: Tensor) -> Tensor:
    """BLIP's ViT (timm's VisionTransformer blocks, vit.py) on the original names: every
    token's output after the final norm, what the text cross-attends to."""
    p = "blip.visual_encoder."
    x = (
        F.conv2d(
            pixels, sd[f"{p}patch_embed.proj.weight"], sd[f"{p}patch_embed.proj.bias"], stride=PATCH
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([sd[f"{p}cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[f"{p}pos_embed"]
    batch, tokens, width = x.shape

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=EPS)

    def linear(x: Tensor, name: str) -> Tensor:
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    for i in range(LAYERS):
        b = f"{p}blocks.{i}."
        qkv = linear(norm(x, f"{b}norm1"), f"{b}attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, width // HEADS).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // HEADS) ** -0.5).softmax(dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + linear(h, f"{b}attn.proj")
        x = x + linear(F.gelu(linear(norm(x, f"{b}norm2"), f"{b}mlp.fc1")), f"{b}mlp.fc2")
    return norm(x, f"{p}norm")


def test_the_vision_tower_computes_what_blips_vit_computes_on_the_original_weights(ir_files):
    folder, *_, state = ir_files
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pixels = clip_preprocess(images, 32)
    with torch.no_grad():
        ours = _reward(folder).module.vision(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, blip_vit(state, pixels), atol=1e-5, rtol=1e-4)


def test_scores_do_not_depend_on_the_scoring_batch_and_are_differentiable(ir_files):
    folder = ir_files[0]
    assert_batch_independent_and_differentiable(
        lambda batch: _reward(folder, batch_size=batch), PROMPTS, seed=4
    )


def test_the_real_model_is_estimated_offline_with_its_published_size():
    reward = reward_with_random_weights(RewardConfig(name="imagereward"), torch.float16)
    assert reward.device.type == "meta"
    # ViT-L 303,301,632 + BERT with cross-attention 141,977,088 + MLP 927,969 (BLIP's
    # unused vision_proj/text_proj, 459,264 more in the file, are not loaded)
    assert sum(p.numel() for p in reward.module.parameters()) == 446_206_689
    # the official file's names at these shapes (446,665,953 weights: 1.79 GB in fp32, the
    # file's size) land exactly on the modules' weights
    scorer = reward.module
    state = to_imagereward(scorer.vision, scorer.text, scorer.head)
    assert sum(v.numel() for k, v in state.items() if "position_ids" not in k) == 446_665_953
    parts = split_imagereward_state(state)
    for part, module in (("vision", scorer.vision), ("text", scorer.text), ("head", scorer.head)):
        expected = {k: v.shape for k, v in module.state_dict().items()}
        assert {k: v.shape for k, v in parts[part].items()} == expected
    config = load_preset("incompressibility")
    config.reward.name = "imagereward"
    held = estimate_memory(config, "sd15").phase("reward").held["reward model"]
    assert 0.89e9 < held < 0.90e9  # fp16 towers, fp32 head, on the card only while scoring


def test_missing_or_wrong_files_are_one_line_saying_what_to_do(ir_files, tmp_path):
    folder, *_, state = ir_files
    for weights, advice in [
        (str(tmp_path / "nope.pt"), "hf download THUDM/ImageReward ImageReward.pt"),
        ("nobody/nothing/ImageReward.pt", "offline, download it first"),  # not in the cache
    ]:
        config = RewardConfig(name="imagereward", imagereward_weights=weights)
        with pytest.raises(UserError, match="set reward.imagereward_weights to the local") as err:
            build_reward("imagereward", config)
        assert advice in str(err.value) and "\n" not in str(err.value)
    config = RewardConfig(
        name="imagereward", imagereward_weights=str(folder / "ImageReward.pt"),
        imagereward_tokenizer="nobody/no-tokenizer",
    )  # fmt: skip
    with pytest.raises(UserError, match="set reward.imagereward_tokenizer to a folder") as err:
        TinyImageReward(config, torch.float32)
    assert "\n" not in str(err.value)
    cases = [
        ({k: v for k, v in state.items() if "crossattention" not in k}, "crossattention"),
        (state | {"blip.itm_head.weight": torch.zeros(2)}, "unexpected weight 'blip.itm_head"),
        ({k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, "MLP head"),
    ]
    for broken, message in cases:
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(UserError, match=message):
            _reward(folder, tmp_path / "broken.pt")
    run = load_preset("incompressibility")
    run.reward.name, run.reward.mix = "mix", {"imagereward": 1.0}
    run.reward.imagereward_tokenizer = ""
    with pytest.raises(UserError, match="reward.imagereward_tokenizer must not be empty"):
        validate(run)
