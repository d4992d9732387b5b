"""Model architectures by name, built from their configs with random weights.

Memory and speed depend on shapes, not values: the memory benchmark builds Stable
Diffusion 1.5 from the configs below (no download) on the ``meta`` device to estimate,
or on the GPU to measure. ``pocket`` and any local diffusers folder are read from
the folder's own config files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lowvram_ddpo.errors import UserError

SD_SCHEDULER = dict(  # Stable Diffusion 1.x's noise schedule (its scheduler_config.json)
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_ENCODER = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

LCM_SCHEDULER = dict(SD_SCHEDULER, _class_name="LCMScheduler", original_inference_steps=50)
"""A latent consistency model's scheduler (LCM_Dreamshaper_v7 and the pocket LCM)."""

ARCHITECTURES = {
    "sd15": "Stable Diffusion 1.5 (860 M UNet), built from its config",
    "sd15-lcm": "an LCM distilled from SD 1.5 (LCM_Dreamshaper_v7's shape: SD 1.5 + a "
    "256-d guidance embedding)",
}


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that hold accelerator memory."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    scheduler_config: dict
    native_resolution: int


def _folder_configs(folder: Path) -> tuple[dict, dict, CLIPTextConfig, dict]:
    def read(sub: str, name: str) -> dict:
        path = folder / sub / name
        if not path.is_file():
            raise UserError(f"{folder} has no {sub}/{name}: pass a diffusers pipeline folder")
        return json.loads(path.read_text())

    unet = UNet2DConditionModel.load_config(folder / "unet")
    vae = AutoencoderKL.load_config(folder / "vae")
    text = CLIPTextConfig(**{k: v for k, v in read("text_encoder", "config.json").items()})
    return unet, vae, text, read("scheduler", "scheduler_config.json")


def architecture_configs(arch: str) -> tuple[dict, dict, CLIPTextConfig, dict]:
    """(UNet config, VAE config, text encoder config, scheduler config) for a name or folder."""
    if arch == "sd15":
        return SD15_UNET, SD15_VAE, CLIPTextConfig(**SD15_TEXT_ENCODER), SD_SCHEDULER
    if arch == "sd15-lcm":
        unet = dict(SD15_UNET, time_cond_proj_dim=256)
        return unet, SD15_VAE, CLIPTextConfig(**SD15_TEXT_ENCODER), LCM_SCHEDULER
    from lowvram_ddpo.models import resolve_model_name

    folder = Path(resolve_model_name(arch)).expanduser()
    if not folder.is_dir():
        folder = _hub_configs(arch)
    return _folder_configs(folder)


def _hub_configs(name: str) -> Path:
    """The config files (only) of a hub model, from the cache or downloaded (a few KB)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.txt"]))
    except Exception as err:  # noqa: BLE001  (any hub failure gets the same advice)
        known = ", ".join([*ARCHITECTURES, "pocket"])
        raise UserError(
            f"cannot read the configs of '{name}' ({type(err).__name__}): pass one of {known}, "
            "a local diffusers folder, or a hub id reachable from here"
        ) from None


@contextmanager
def building_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created in the block get their random weights on ``device`` (``meta``: shapes
    only, no memory), directly in ``dtype``: no fp32 copy first, no cast warnings."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default_dtype)


def build_components(arch: str, device: str | torch.device, dtype: torch.dtype) -> Components:
    """Random-weight UNet, VAE and text encoder of ``arch`` on ``device`` (``meta``: no memory)."""
    unet_config, vae_config, text_config, scheduler = architecture_configs(arch)
    with building_on(device, dtype):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return Components(unet, vae, text_encoder, dict(scheduler), unet.config.sample_size * scale)


def random_pipeline(arch: str, dtype: torch.dtype, device: str = "cpu"):  # noqa: ANN201
    """A ``StableDiffusionPipeline`` of ``arch`` with random weights and a byte-level
    tokenizer built in code: what the memory benchmark trains on a GPU without a download."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    from lowvram_ddpo.pocket.tokenizer import build_tokenizer

    parts = build_components(arch, device, dtype)
    length = parts.text_encoder.config.max_position_embeddings
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=build_tokenizer([], max_length=length),
        unet=parts.unet,
        scheduler=(
            LCMScheduler
            if parts.scheduler_config.get("_class_name") == "LCMScheduler"
            else DDIMScheduler
        ).from_config(parts.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def default_architecture(model_name: str) -> str:
    """What `bench memory` builds for a preset's model without downloading it: the shipped
    pocket models themselves, SD 1.5's shape for anything else (LCM-shaped for LCMs)."""
    from lowvram_ddpo.models import MODEL_ALIASES

    if model_name in MODEL_ALIASES:
        return model_name
    return "sd15-lcm" if "lcm" in model_name.lower() else "sd15"
