"""HPS v2 (Wu et al. 2023, *Human Preference Score v2*): a human-preference reward.

An open_clip ViT-H/14 fine-tuned on HPD v2's human choices; the score is the plain
cosine of the image's and the prompt's embeddings (~0.2-0.35 for typical images with
v2.1; ``hpsv2.score``'s number, its benchmark shows it x 100). v2.0 and v2.1 scores are
not comparable.

The official package needs the network at every load and tkinter, and scores without
gradients, so it is not used: the official ``HPS_v2.1_compressed.pt`` (fp16, open_clip
names, every weight) is read with ``weights_only`` and renamed into transformers'
``CLIPModel``, the same architecture (``CLIP_H_14``, as PickScore); a CLIPModel folder
works too. Images are letterboxed as open_clip's ``resize_longest_max`` does (the same
as a plain resize for square images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPConfig, CLIPModel

from lowvram_ddpo.config import RewardConfig
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards.base import register_reward
from lowvram_ddpo.rewards.clip_score import (
    CLIP_H_14,
    ClipAgreement,
    ClipSimilarityReward,
    load_tokenizer,
)
from lowvram_ddpo.rewards.weights import (
    from_state_dict,
    is_weights_file,
    load_state_file,
    weights_file,
)

HPS_HUB_FILE = "xswu/HPSv2/HPS_v2.1_compressed.pt"
OPENCLIP_NAMES = {  # open_clip (= OpenAI CLIP) name -> transformers CLIPModel name
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
OPENCLIP_PROJECTIONS = {  # used as x @ proj by open_clip, as Linear (x @ W.T) by transformers
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
OPENCLIP_TOWERS = {  # the resblocks' prefixes (whole prefixes: "transformer." is in both)
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "transformer.resblocks.": "text_model.encoder.layers.",
}
OPENCLIP_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _block_tensors(key: str, value: Tensor, prefix: str) -> dict[str, Tensor]:
    """One resblock tensor ("<i>.<module>.<param>" after the tower prefix) renamed; the
    packed attention input projection is split into q, k, v (its row blocks, in order)."""
    index, name = key.split(".", 1)
    layer = f"{prefix}{index}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = name.rsplit("_", 1)[1]
        parts = zip("qkv", value.chunk(3), strict=True)
        return {f"{layer}self_attn.{n}_proj.{param}": t for n, t in parts}
    module, param = name.rsplit(".", 1)
    if module not in OPENCLIP_BLOCK_NAMES:
        raise UserError(f"HPS weights: unexpected open_clip weight '{key}' in a resblock")
    return {f"{layer}{OPENCLIP_BLOCK_NAMES[module]}.{param}": value}


def openclip_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict (``{"state_dict": ...}``, ``module.`` prefixes allowed)
    under transformers' CLIPModel names; an unknown name is an error, not skipped."""
    state = state.get("state_dict", state)
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key in OPENCLIP_NAMES:
            converted[OPENCLIP_NAMES[key]] = value
        elif key in OPENCLIP_PROJECTIONS:
            converted[OPENCLIP_PROJECTIONS[key]] = value.T.contiguous()
        else:
            tower = next((p for p in OPENCLIP_TOWERS if key.startswith(p)), None)
            if tower is None:
                raise UserError(f"HPS weights: '{key}' is not an open_clip CLIP weight")
            converted |= _block_tensors(key.removeprefix(tower), value, OPENCLIP_TOWERS[tower])
    return converted


def load_hps_file(path: Path, shape: dict[str, Any], dtype: torch.dtype) -> CLIPModel:
    """The CLIPModel of an open_clip checkpoint file."""
    state = openclip_to_transformers(load_state_file(path, mmap=True))
    return from_state_dict(CLIPModel, CLIPConfig(**shape), state, dtype, f"HPS weights {path}")


@register_reward("hpsv2", "HPS v2.1: human preference, CLIP-H tuned on HPD v2 (cos, ~0.2-0.35)")
class HpsReward(ClipSimilarityReward):
    model_setting = "hps_weights"
    tokenizer_setting = "hps_tokenizer"
    fit = "pad"  # open_clip's resize_longest_max, as hpsv2 preprocesses
    shape: dict[str, Any] = CLIP_H_14
    """The CLIP in the open_clip files (ViT-H-14; the tests use a tiny one)."""

    def __init__(
        self, config: RewardConfig, dtype: torch.dtype, agreement: ClipAgreement | None = None
    ) -> None:
        if agreement is None and is_weights_file(config.hps_weights):
            # the file first: a missing one is the likelier mistake, and finding it is cheap
            setting = "reward.hps_weights"
            path = weights_file(config.hps_weights, "the HPS weights", setting, HPS_HUB_FILE)
            tokenizer = load_tokenizer(config.hps_tokenizer, self.tokenizer_setting)
            clip = load_hps_file(path, self.shape, dtype)
            agreement = ClipAgreement(clip, tokenizer, self.fit)
        super().__init__(config, dtype, agreement)

    def from_cosine(self, cosine: Tensor) -> Tensor:
        return cosine  # hpsv2.score: the cosine itself, no logit scale

    @classmethod
    def clip_config(cls, config: RewardConfig) -> CLIPConfig:
        if is_weights_file(config.hps_weights):
            return CLIPConfig(**cls.shape)
        return super().clip_config(config)
