"""Text-image agreement rewards on a CLIP model: PickScore and CLIPScore.

Both embed the image and its prompt with a CLIP model and compare the two unit vectors:

- ``pickscore`` (Kirstain et al. 2023, *Pick-a-Pic*): CLIP ViT-H/14 fine-tuned on human
  preferences between images of one prompt; the score is CLIP's logit,
  ``logit_scale.exp() * cos`` (~20-23 for typical images; a higher one was preferred).
  Weights ``yuvalkirstain/PickScore_v1``, tokenizer from the CLIP it was tuned from.
- ``clipscore`` (Hessel et al. 2021): ``2.5 * max(cos, 0)`` with CLIP ViT-L/14 (the
  model of ``reward.clip_model``), how well the image shows its prompt.

The CLIP model is loaded with transformers from a hub id or a folder; images are
preprocessed as tensors (``clip_image``), so the score stays differentiable; the model
lives on the GPU only while scoring, like every reward model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from lowvram_ddpo.architectures import building_on
from lowvram_ddpo.config import RewardConfig
from lowvram_ddpo.errors import UserError, first_line, loading_errors
from lowvram_ddpo.rewards.aesthetic import VIT_L_14
from lowvram_ddpo.rewards.base import ModelReward, register_reward
from lowvram_ddpo.rewards.clip_image import Fit, clip_preprocess

CLIP_TEXT_L_14 = dict(  # openai/clip-vit-large-patch14's text tower
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    hidden_act="quick_gelu",
)  # fmt: skip
CLIP_H_14 = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore_v1's shape)
    text_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        hidden_act="gelu",
    ),
    vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="gelu",
    ),
    projection_dim=1024,
)  # fmt: skip
KNOWN_SHAPES = {
    "yuvalkirstain/PickScore_v1": CLIP_H_14,
    "openai/clip-vit-large-patch14": dict(
        text_config=CLIP_TEXT_L_14, vision_config=VIT_L_14, projection_dim=768
    ),
}
"""Configs of the default models, so the memory estimate needs no download."""


class ClipAgreement(nn.Module):
    """(images [B, 3, H, W] in [0, 1], prompts) -> [B] cosine of image and text embeddings."""

    def __init__(
        self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase | None, fit: Fit = "crop"
    ) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.fit = fit
        """How a non-square image fits CLIP's square (``clip_preprocess``)."""

    def embed_text(self, prompts: list[str]) -> Tensor:
        length = self.clip.config.text_config.max_position_embeddings
        if self.tokenizer is None:  # the memory estimate's random model: tokens of full length
            ids = torch.zeros(len(prompts), length, dtype=torch.long, device=self.clip.device)
            mask = None  # all tokens count (transformers reads a mask's values: not on meta)
        else:
            tokens = self.tokenizer(
                prompts, padding="max_length", truncation=True, max_length=length,
                return_tensors="pt",
            ).to(self.clip.device)  # fmt: skip
            ids, mask = tokens.input_ids, tokens.attention_mask
        text = self.clip.text_model(ids, attention_mask=mask)
        return self.clip.text_projection(text.pooler_output)

    def embed_images(self, images: Tensor) -> Tensor:
        pixels = clip_preprocess(images, self.clip.config.vision_config.image_size, self.fit)
        vision = self.clip.vision_model(pixel_values=pixels.to(self.clip.dtype))
        return self.clip.visual_projection(vision.pooler_output)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        image = self.embed_images(images).float()
        text = self.embed_text(prompts).float()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(dim=-1)


def load_tokenizer(name: str, setting: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id (the cache when offline) or a folder, with a one-line error."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except loading_errors() as err:  # ValueError: a folder without tokenizer files
        raise UserError(
            f"could not load the tokenizer '{name}' ({first_line(err)}); offline, "
            f"download it first (`hf download {name}`) or set reward.{setting} to a folder"
        ) from None


def load_clip(
    name: str, tokenizer_name: str, dtype: torch.dtype, setting: str, fit: Fit = "crop"
) -> ClipAgreement:
    """The CLIP model and its tokenizer (hub ids or folders), with one-line errors."""
    try:
        clip = CLIPModel.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name)
    except loading_errors() as err:
        raise UserError(
            f"could not load the CLIP model '{name}' or its tokenizer "
            f"({first_line(err)}); offline, download them first (`hf download "
            f"{name}`) or set reward.{setting} to a folder"
        ) from None
    return ClipAgreement(clip, tokenizer, fit)


class ClipSimilarityReward(ModelReward):
    """A reward that maps ``ClipAgreement``'s cosine through ``from_cosine``; subclasses
    name the ``RewardConfig`` fields of their model (and tokenizer)."""

    model_setting: str = "clip_model"
    tokenizer_setting: str = ""
    """The field naming the tokenizer's source; "": the model's own folder."""
    fit: Fit = "crop"
    """How non-square images fit the model's square input (``clip_preprocess``)."""

    def __init__(
        self, config: RewardConfig, dtype: torch.dtype, agreement: ClipAgreement | None = None
    ) -> None:
        self.batch_size = config.batch_size
        name = getattr(config, self.model_setting)
        tokenizer = getattr(config, self.tokenizer_setting) if self.tokenizer_setting else ""
        self.module = agreement or load_clip(name, tokenizer, dtype, self.model_setting, self.fit)

    def from_cosine(self, cosine: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.from_cosine(self.module(images, prompts))

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> ClipSimilarityReward:
        """The model's shape with random weights (``meta``: shapes only) and no tokenizer
        (its text is a stand-in of full length): the memory benchmark's."""
        clip_config = cls.clip_config(config)
        with building_on(device, dtype):
            clip = CLIPModel(clip_config)
        return cls(config, dtype, ClipAgreement(clip, None, cls.fit))

    @classmethod
    def clip_config(cls, config: RewardConfig) -> CLIPConfig:
        """The model's shape: known for the defaults (no download), else its config.json."""
        name = getattr(config, cls.model_setting)
        shape = KNOWN_SHAPES.get(name)
        return CLIPConfig(**shape) if shape else CLIPConfig.from_pretrained(name)


@register_reward("pickscore", "PickScore: human preference, CLIP-H tuned on Pick-a-Pic (~20-23)")
class PickScoreReward(ClipSimilarityReward):
    model_setting = "pickscore_model"
    tokenizer_setting = "pickscore_tokenizer"

    def from_cosine(self, cosine: Tensor) -> Tensor:
        return self.module.clip.logit_scale.exp().float() * cosine


CLIPSCORE_WEIGHT = 2.5
"""Hessel et al.'s w: it spreads typical cosines (~0.3) over ~0-1."""


@register_reward("clipscore", "CLIPScore: 2.5 x max(cos, 0) of CLIP ViT-L/14 embeddings (0-2.5)")
class ClipScoreReward(ClipSimilarityReward):
    model_setting = "clip_model"

    def from_cosine(self, cosine: Tensor) -> Tensor:
        return CLIPSCORE_WEIGHT * cosine.clamp(min=0)
