"""ImageReward v1.0 (Xu et al. 2023): a human-preference reward model on BLIP.

The image goes through BLIP's ViT-L/16 (224 px, CLIP's crop and normalisation); the
prompt (BERT-uncased tokens, 35 at most) goes through BLIP's text encoder, which
cross-attends to every image token; the [CLS] output goes through an MLP with no
nonlinearities, and the result is standardised with the training set's mean and std:
``(mlp(h_cls) - 0.1672) / 1.0333``, so typical scores lie in ~-2..2 (0: an average image).

The ``image-reward`` package cannot be imported with transformers 5 and fetches its
config and tokenizer from the hub at each load, so it is not used: the official
``ImageReward.pt`` (fp32, BLIP's own names) is read with ``weights_only`` into
transformers' ``BlipVisionModel`` and ``BlipTextModel``, line-by-line ports of BLIP's
modules; the score stays differentiable w.r.t. the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    PreTrainedTokenizerBase,
)

from lowvram_ddpo.architectures import building_on
from lowvram_ddpo.config import RewardConfig
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards.base import ModelReward, register_reward
from lowvram_ddpo.rewards.clip_image import clip_preprocess
from lowvram_ddpo.rewards.clip_score import load_tokenizer
from lowvram_ddpo.rewards.weights import from_state_dict, load_state_file, weights_file

IMAGEREWARD_HUB_FILE = "THUDM/ImageReward/ImageReward.pt"
IMAGEREWARD_VISION = dict(  # BLIP's create_vit("large") at 224 px
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=16, hidden_act="gelu",
    layer_norm_eps=1e-6,  # timm's ViT; BlipVisionConfig's default is 1e-5
)  # fmt: skip
IMAGEREWARD_TEXT = dict(  # ImageReward's med_config.json, encoder_width set to the ViT's
    vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
    hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
    is_decoder=True,  # builds the cross-attention; called as an encoder (bidirectional)
)  # fmt: skip
MAX_LENGTH = 35
"""ImageReward's tokenizer call: padding to 35 tokens, longer prompts truncated."""
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
"""The head's output over ImageReward's training set: scores are z-scores of it."""

VISION_NAMES = {  # after "blip.visual_encoder."; transformers' convert_blip script's renames
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
VISION_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
"""In the file, not in the score: BLIP's contrastive projections, an index buffer."""


def imagereward_head(width: int) -> nn.Sequential:
    """ImageReward's MLP in its own layout (Linear layers at 0, 2, 4, 6, 7; the dropouts
    between them are idle in eval and its ReLUs are commented out: one affine map)."""
    return nn.Sequential(
        nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip


def _vision_name(key: str) -> str:
    if key in VISION_NAMES:
        return VISION_NAMES[key]
    if key.startswith("blocks."):
        index, name = key.removeprefix("blocks.").split(".", 1)
        module, param = name.rsplit(".", 1)
        if module in VISION_BLOCK_NAMES:
            return f"encoder.layers.{index}.{VISION_BLOCK_NAMES[module]}.{param}"
    raise UserError(f"ImageReward weights: unexpected vision weight 'blip.visual_encoder.{key}'")


def split_imagereward_state(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The official state dict as {"vision", "text", "head"} state dicts under the names of
    BlipVisionModel, BlipTextModel (BLIP's own) and ``imagereward_head``."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state.items():
        if key.startswith(UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            parts["vision"][_vision_name(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            parts["head"][key.removeprefix("mlp.layers.")] = value
        else:
            raise UserError(f"ImageReward weights: unexpected weight '{key}'")
    return parts


class ImageRewardScorer(nn.Module):
    """(images [B, 3, H, W] in [0, 1], prompts) -> [B] ImageReward scores."""

    def __init__(
        self, vision: BlipVisionModel, text: BlipTextModel, head: nn.Sequential,
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.vision = vision.requires_grad_(False).eval()
        self.text = text.requires_grad_(False).eval()
        # fp32 whatever the towers' dtype: 0.9 M weights, and no rounding of the score
        self.head = head.float().requires_grad_(False).eval()
        self.tokenizer = tokenizer

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        device = self.text.device
        if self.tokenizer is None:  # the memory estimate's random model: full-length text
            return torch.zeros(len(prompts), MAX_LENGTH, dtype=torch.long, device=device), None
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="pt",
        ).to(device)  # fmt: skip
        return tokens.input_ids, tokens.attention_mask

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = clip_preprocess(images, self.vision.config.image_size)
        image = self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state
        ids, mask = self.tokens(prompts)
        # keyword arguments only: BlipTextModel's positional order changed across versions
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
        reward = self.head(text.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - SCORE_MEAN) / SCORE_STD


def load_imagereward_file(
    path: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
    vision_shape: dict[str, Any], text_shape: dict[str, Any],
) -> ImageRewardScorer:  # fmt: skip
    """The scorer of an official checkpoint."""
    parts = split_imagereward_state(load_state_file(path, mmap=True))
    what = f"ImageReward weights {path}"
    vision = from_state_dict(
        BlipVisionModel, BlipVisionConfig(**vision_shape), parts["vision"], dtype, what
    )
    text_config = BlipTextConfig(**text_shape)
    text = from_state_dict(
        BlipTextModel, text_config, parts["text"], dtype, what, add_pooling_layer=False
    )
    head = imagereward_head(text_config.hidden_size)
    try:
        head.load_state_dict(parts["head"])
    except RuntimeError as err:  # missing, unexpected or misshapen
        problem = str(err).splitlines()[-1].strip()
        raise UserError(f"{what}: its MLP head does not fit ({problem})") from None
    return ImageRewardScorer(vision, text, head, tokenizer)


@register_reward(
    "imagereward",
    "ImageReward v1.0: BLIP ViT-L + BERT cross-attention human-preference score (z-scored, ~-2..2)",
)
class ImageReward(ModelReward):
    vision_shape: dict[str, Any] = IMAGEREWARD_VISION
    text_shape: dict[str, Any] = IMAGEREWARD_TEXT
    """The model in ImageReward.pt (the tests use tiny ones)."""

    def __init__(
        self, config: RewardConfig, dtype: torch.dtype, scorer: ImageRewardScorer | None = None
    ) -> None:
        self.batch_size = config.batch_size
        if scorer is None:
            # the file first: a missing one is the likelier mistake, and finding it is cheap
            what, setting = "the ImageReward weights", "reward.imagereward_weights"
            path = weights_file(config.imagereward_weights, what, setting, IMAGEREWARD_HUB_FILE)
            tokenizer = load_tokenizer(config.imagereward_tokenizer, "imagereward_tokenizer")
            scorer = load_imagereward_file(
                path, tokenizer, dtype, self.vision_shape, self.text_shape
            )
        self.module = scorer

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.module(images, prompts)

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> ImageReward:
        """The model's shape with random weights (``meta``: shapes only) and no tokenizer
        (its text is a stand-in of full length): the memory benchmark's."""
        with building_on(device, dtype):
            vision = BlipVisionModel(BlipVisionConfig(**cls.vision_shape))
            text = BlipTextModel(BlipTextConfig(**cls.text_shape), add_pooling_layer=False)
            head = imagereward_head(text.config.hidden_size)
        return cls(config, dtype, ImageRewardScorer(vision, text, head, None))
