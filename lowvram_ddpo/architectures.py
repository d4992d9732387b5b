"""Model architectures by name, built from their configs with random weights.

Memory and speed depend on shapes, not values: the memory benchmark builds Stable
Diffusion 1.5 or SDXL from the configs below (no download) on the ``meta`` device to estimate,
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
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    Flux2Transformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PretrainedConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from lowvram_ddpo import flux2
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

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 (2.6 B parameters)
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled text 1280
)

SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

SDXL_TEXT_ENCODER_2 = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)

LCM_SCHEDULER = dict(SD_SCHEDULER, _class_name="LCMScheduler", original_inference_steps=50)
"""A latent consistency model's scheduler (LCM_Dreamshaper_v7 and the pocket LCM)."""

SD35M_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3.5-medium (2.5 B MMDiT-X)
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)  # docs/research/flow_matching.md section 4 (the hub's transformer/config.json)

SD35M_VAE = dict(
    SD15_VAE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)

SD3_T5_ENCODER = dict(  # google's T5 v1.1 XXL encoder (4.76 B parameters)
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
)

SD3_SCHEDULER = dict(
    _class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0
)

FLUX2_KLEIN_TRANSFORMER = dict(  # black-forest-labs/FLUX.2-klein-base-4B (3.9 B parameters)
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    guidance_embeds=False,
)  # docs/research/flow_matching.md section 4 (the diffusers transformer/config.json)

FLUX2_VAE = dict(  # AutoencoderKLFlux2's defaults: FLUX.2's VAE (32 channels, 2x2 patches)
    _class_name="AutoencoderKLFlux2",
    block_out_channels=(128, 256, 512, 512),
    latent_channels=32,
    sample_size=1024,
    patch_size=(2, 2),
)

FLUX2_KLEIN_TEXT_ENCODER = dict(  # Qwen/Qwen3-4B's config.json (4.0 B parameters)
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

FLUX2_SCHEDULER = dict(  # FLUX.2's scheduler_config.json; its pipeline computes its own mu
    _class_name="FlowMatchEulerDiscreteScheduler",  # (flux2.shifted_timesteps)
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

ARCHITECTURES = {
    "sd15": "Stable Diffusion 1.5 (860 M UNet), built from its config",
    "sd15-lcm": "an LCM distilled from SD 1.5 (LCM_Dreamshaper_v7's shape: SD 1.5 + a "
    "256-d guidance embedding)",
    "sdxl": "Stable Diffusion XL base 1.0 (2.6 B UNet, two text encoders), built from its config",
    "sd35m": "Stable Diffusion 3.5 Medium (2.5 B MMDiT flow transformer; CLIP-L, CLIP-G and the "
    "4.8 B T5-XXL text encoders), built from its config",
    "flux2-klein": "FLUX.2-klein Base 4B (3.9 B flow transformer, 4.0 B Qwen3 text encoder, "
    "FLUX.2's VAE), built from its config",
}


@dataclass
class ArchitectureConfigs:
    unet: dict
    """The denoiser's config: a UNet's, or (``family`` sd3, flux2) a transformer's."""
    vae: dict
    text_encoder: PretrainedConfig
    """CLIP's (Qwen3's for FLUX.2)."""
    scheduler: dict
    text_encoder_2: CLIPTextConfig | None = None
    """SDXL's and SD 3's second (projected) text encoder."""
    text_encoder_3: T5Config | None = None
    """SD 3's T5 (None: a folder without it, or ``model.use_t5 = false``)."""
    family: str = "sd"
    """sd (1.x/2.x), sdxl, sd3 or flux2: which pipeline the parts make."""


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that hold accelerator memory."""

    unet: nn.Module
    """The denoiser: a ``UNet2DConditionModel``, SD 3's or FLUX.2's transformer."""
    vae: nn.Module
    text_encoder: nn.Module
    """CLIP (Qwen3 for FLUX.2)."""
    scheduler_config: dict
    native_resolution: int
    text_encoder_2: CLIPTextModelWithProjection | None = None
    text_encoder_3: T5EncoderModel | None = None
    family: str = "sd"

    @property
    def text_encoders(self) -> list[nn.Module]:
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [m for m in encoders if m is not None]


def _folder_configs(folder: Path) -> ArchitectureConfigs:
    def read(sub: str, name: str) -> dict:
        path = folder / sub / name
        if not path.is_file():
            raise UserError(f"{folder} has no {sub}/{name}: pass a diffusers pipeline folder")
        return json.loads(path.read_text())

    second = folder / "text_encoder_2" / "config.json"
    third = folder / "text_encoder_3" / "config.json"
    transformer = (folder / "transformer").is_dir()
    denoiser = read("transformer" if transformer else "unet", "config.json")
    if flux2.is_flux2_config(denoiser):
        return ArchitectureConfigs(
            unet=denoiser,
            vae=read("vae", "config.json"),
            text_encoder=Qwen3Config(**read("text_encoder", "config.json")),
            scheduler=read("scheduler", "scheduler_config.json"),
            family="flux2",
        )
    return ArchitectureConfigs(
        unet=denoiser,
        vae=AutoencoderKL.load_config(folder / "vae"),
        text_encoder=CLIPTextConfig(**read("text_encoder", "config.json")),
        scheduler=read("scheduler", "scheduler_config.json"),
        text_encoder_2=CLIPTextConfig(**read("text_encoder_2", "config.json"))
        if second.is_file()
        else None,
        text_encoder_3=T5Config(**read("text_encoder_3", "config.json"))
        if third.is_file()
        else None,
        family="sd3" if transformer else ("sdxl" if second.is_file() else "sd"),
    )


def architecture_configs(arch: str) -> ArchitectureConfigs:
    """The configs of a named architecture, a diffusers folder or a hub id's."""
    text = CLIPTextConfig(**SD15_TEXT_ENCODER)
    if arch == "sd15":
        return ArchitectureConfigs(SD15_UNET, SD15_VAE, text, SD_SCHEDULER)
    if arch == "sd15-lcm":
        return ArchitectureConfigs(
            dict(SD15_UNET, time_cond_proj_dim=256), SD15_VAE, text, LCM_SCHEDULER
        )
    if arch == "sdxl":
        second = CLIPTextConfig(**SDXL_TEXT_ENCODER_2)
        return ArchitectureConfigs(SDXL_UNET, SDXL_VAE, text, SD_SCHEDULER, second, family="sdxl")
    if arch == "sd35m":
        return ArchitectureConfigs(
            SD35M_TRANSFORMER,
            SD35M_VAE,
            text,
            SD3_SCHEDULER,
            CLIPTextConfig(**SDXL_TEXT_ENCODER_2),
            T5Config(**SD3_T5_ENCODER),
            family="sd3",
        )
    if arch == "flux2-klein":
        return ArchitectureConfigs(
            FLUX2_KLEIN_TRANSFORMER,
            FLUX2_VAE,
            Qwen3Config(**FLUX2_KLEIN_TEXT_ENCODER),
            FLUX2_SCHEDULER,
            family="flux2",
        )
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


def build_components(
    arch: str, device: str | torch.device, dtype: torch.dtype, use_t5: bool = True
) -> Components:
    """Random-weight denoiser, VAE and text encoder(s) of ``arch`` on ``device`` (``meta``:
    no memory); SD 3's T5 only with ``use_t5``."""
    configs = architecture_configs(arch)
    with building_on(device, dtype):
        unet, vae, text_encoder = _denoiser_vae_and_encoder(configs)
        second, third = configs.text_encoder_2, configs.text_encoder_3 if use_t5 else None
        text_encoder_2 = None if second is None else CLIPTextModelWithProjection(second)
        text_encoder_3 = None if third is None else T5EncoderModel(third)
    for module in (unet, vae, text_encoder, text_encoder_2, text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    return Components(
        unet,
        vae,
        text_encoder,
        dict(configs.scheduler),
        _native_size(configs),
        text_encoder_2,
        text_encoder_3,
        configs.family,
    )


def _denoiser_vae_and_encoder(configs: ArchitectureConfigs) -> tuple[nn.Module, ...]:
    if configs.family == "flux2":
        return (
            Flux2Transformer2DModel.from_config(configs.unet),
            AutoencoderKLFlux2.from_config(configs.vae),
            Qwen3ForCausalLM(configs.text_encoder),
        )
    sd3 = configs.family == "sd3"
    return (
        (SD3Transformer2DModel if sd3 else UNet2DConditionModel).from_config(configs.unet),
        AutoencoderKL.from_config(configs.vae),
        (CLIPTextModelWithProjection if sd3 else CLIPTextModel)(configs.text_encoder),
    )


def _native_size(configs: ArchitectureConfigs) -> int:
    """The denoiser's latent rows (FLUX.2's transformer has none: its pipeline's default,
    as ``preflight.native_resolution_of`` reads it) x the VAE's factor."""
    rows = configs.unet.get("sample_size") or flux2.DEFAULT_LATENT_ROWS
    return rows * 2 ** (len(configs.vae["block_out_channels"]) - 1)


def native_resolution(arch: str) -> int:
    """The image size ``arch`` was trained at (512 for SD 1.5, 1024 for SDXL)."""
    return _native_size(architecture_configs(arch))


def likely_native_resolution(model_name: str) -> int:
    """A model's own image size without a download: read from a local or shipped folder,
    else guessed from the name (1024 for SDXL, 512 for anything else)."""
    from lowvram_ddpo.models import resolve_model_name

    try:
        folder = Path(resolve_model_name(model_name)).expanduser()
    except UserError:
        folder = Path(model_name)
    denoiser = any((folder / sub / "config.json").is_file() for sub in ("unet", "transformer"))
    if denoiser and (folder / "vae" / "config.json").is_file():
        return _native_size(_folder_configs(folder))
    arch = default_architecture(model_name)
    return native_resolution(arch) if arch in ARCHITECTURES else 512


def random_pipeline(arch: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):  # noqa: ANN201
    """A Stable Diffusion (XL, 3) or FLUX.2-klein pipeline of ``arch`` with random weights
    and byte-level tokenizers built in code: what the memory benchmark trains on a GPU
    without a download (SD 3 without its T5, whose tokenizer cannot be built offline).
    The weights come from ``seed`` (PyTorch's generators are seeded with it): two
    benchmark rows of one architecture train the same model, so their rewards compare."""
    torch.manual_seed(seed)
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        LCMScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from lowvram_ddpo.pocket.tokenizer import build_tokenizer

    parts = build_components(arch, device, dtype, use_t5=False)
    if parts.family == "flux2":
        return _random_flux2_pipeline(parts)
    length = parts.text_encoder.config.max_position_embeddings
    if parts.family == "sd3":
        from lowvram_ddpo.models import with_denoiser_as_unet

        pipe = StableDiffusion3Pipeline(
            transformer=parts.unet,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config),
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=build_tokenizer([], max_length=length),
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=build_tokenizer([], max_length=length),
            text_encoder_3=None,
            tokenizer_3=None,
        )
        return with_denoiser_as_unet(pipe)
    is_lcm = parts.scheduler_config.get("_class_name") == "LCMScheduler"
    common = dict(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=build_tokenizer([], max_length=length),
        unet=parts.unet,
        scheduler=(LCMScheduler if is_lcm else DDIMScheduler).from_config(parts.scheduler_config),
    )
    if parts.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            **common,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=build_tokenizer([], max_length=length),
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _random_flux2_pipeline(parts: Components):  # noqa: ANN202
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from lowvram_ddpo.models import with_denoiser_as_unet
    from lowvram_ddpo.pocket.tokenizer import build_chat_tokenizer

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=build_chat_tokenizer(),
        transformer=parts.unet,
    )
    return with_denoiser_as_unet(pipe)


def default_architecture(model_name: str) -> str:
    """What `bench memory` builds for a preset's model without downloading it: the shipped
    pocket models themselves, SD 3.5 Medium's shape for SD 3 names, FLUX.2-klein 4B's for
    FLUX.2 names, SDXL's for names with "xl", SD 1.5's for anything else (LCM-shaped for
    LCMs)."""
    from lowvram_ddpo.models import MODEL_ALIASES

    if model_name in MODEL_ALIASES:
        return model_name
    name = model_name.lower()
    if any(tag in name for tag in ("stable-diffusion-3", "sd3", "sd35", "sd-3")):
        return "sd35m"
    if any(tag in name for tag in ("flux.2", "flux2")):
        return "flux2-klein"
    if "xl" in name:
        return "sdxl"
    return "sd15-lcm" if "lcm" in name else "sd15"
