"""The LAION aesthetic score (DDPO paper's aesthetic task).

CLIP ViT-L/14's image embedding, L2-normalised, through LAION's "improved aesthetic
predictor": an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no
nonlinearities. At inference it is one affine map, so it is folded into a single
768 -> 1 layer. Only the vision tower is loaded (~304 M params, ~0.6 GB in fp16,
not the whole CLIP), and images are preprocessed as tensors on the scorer's device
(resize, centre crop, normalise), so the score stays differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lowvram_ddpo.architectures import building_on
from lowvram_ddpo.config import RewardConfig
from lowvram_ddpo.errors import UserError, first_line, loading_errors
from lowvram_ddpo.rewards.base import ModelReward, register_reward
from lowvram_ddpo.rewards.clip_image import clip_preprocess
from lowvram_ddpo.rewards.weights import load_state_file, weights_file

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
VIT_L_14 = dict(  # openai/clip-vit-large-patch14's vision tower (its config.json)
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
LAION_LINEAR_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
"""The Linear layers of LAION's MLP in its state dict (the odd indices are dropouts)."""


def fold_linear_layers(state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(weight [1, D], bias [1]) of the affine map the stacked Linear layers compute."""
    if "weight" in state and "bias" in state:  # already folded
        return state["weight"].float(), state["bias"].float()
    missing = [f"{n}.weight" for n in LAION_LINEAR_LAYERS if f"{n}.weight" not in state]
    if missing:
        raise UserError(
            f"the aesthetic head has no {missing[0]}: expected LAION's improved-aesthetic-"
            "predictor state dict (layers.0/2/4/6/7)"
        )
    weight = bias = None
    for name in LAION_LINEAR_LAYERS:
        w, b = state[f"{name}.weight"].double(), state[f"{name}.bias"].double()
        weight = w if weight is None else w @ weight
        bias = b if bias is None else w @ bias + b
    return weight.float(), bias.float()


def load_head_state(location: str) -> dict[str, Tensor]:
    """LAION's head weights from a .pth (read with weights_only=True) or .safetensors file."""
    path = weights_file(location, "the aesthetic head", "reward.head_weights", DEFAULT_HEAD)
    return load_state_file(path)


def load_clip_vision(name: str, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    try:
        return CLIPVisionModelWithProjection.from_pretrained(name, dtype=dtype)
    except loading_errors() as err:
        raise UserError(
            f"could not load the CLIP model '{name}' ({first_line(err)}); offline, "
            f"download it first (`hf download {name}`) or set reward.clip_model to a folder"
        ) from None


class AestheticScorer(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> [B] aesthetic scores."""

    def __init__(self, vision: CLIPVisionModelWithProjection, weight: Tensor, bias: Tensor):
        super().__init__()
        self.vision = vision.requires_grad_(False).eval()
        self.head = nn.Linear(weight.shape[1], 1)
        self.head.weight.data.copy_(weight)
        self.head.bias.data.copy_(bias)
        self.head.requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.vision.config.image_size)

    def forward(self, images: Tensor) -> Tensor:
        pixels = self.preprocess(images).to(self.vision.dtype)
        embeds = self.vision(pixel_values=pixels).image_embeds.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return F.linear(embeds, self.head.weight.float(), self.head.bias.float()).squeeze(-1)


@register_reward("aesthetic", "LAION aesthetic score: CLIP ViT-L/14 + LAION's linear head (~1-10)")
class AestheticReward(ModelReward):
    def __init__(
        self, config: RewardConfig, dtype: torch.dtype, scorer: AestheticScorer | None = None
    ) -> None:
        self.batch_size = config.batch_size
        if scorer is None:
            weight, bias = fold_linear_layers(load_head_state(config.head_weights))
            scorer = AestheticScorer(load_clip_vision(config.clip_model, dtype), weight, bias)
        self.module = scorer

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.module(images)

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> AestheticReward:
        vision_config = (
            CLIPVisionConfig(**VIT_L_14)
            if config.clip_model == DEFAULT_CLIP
            else CLIPVisionConfig.from_pretrained(config.clip_model)
        )
        with building_on(device, dtype):
            vision = CLIPVisionModelWithProjection(vision_config)
            weight, bias = torch.zeros(1, vision_config.projection_dim), torch.zeros(1)
            scorer = AestheticScorer(vision, weight, bias)
        return cls(config, dtype, scorer)
