"""Load a Stable Diffusion pipeline and put LoRA adapters on its UNet.

The frozen base is cast to the run's dtype; the adapter weights stay fp32 so that
small updates are not lost to fp16 rounding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from lowvram_ddpo import flux2
from lowvram_ddpo.config import BITSANDBYTES_QUANTIZE
from lowvram_ddpo.errors import UserError, first_line, loading_errors

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _looks_like_path(name: str) -> bool:
    # Hub ids are "org/name": one slash, no leading "./", "/" or "~".
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


POCKET_DIR = Path(__file__).parent / "pocket" / "weights"
MODEL_ALIASES = {
    "pocket": POCKET_DIR / "pocket-sd",
    "pocket-lcm": POCKET_DIR / "pocket-lcm",
    "pocket-flow": POCKET_DIR / "pocket-flow",  # SD 3's architecture (pocket/train_flow.py)
}
"""Names that stand for model folders shipped inside the package (see ``lowvram_ddpo.pocket``)."""
POCKET_BUILDERS = {
    "pocket": "lowvram_ddpo.pocket.train",
    "pocket-lcm": "lowvram_ddpo.pocket.train",  # it distils pocket-lcm after pocket-sd
    "pocket-flow": "lowvram_ddpo.pocket.train_flow",
}
"""The script that trains each shipped model."""


def show_loading_bars(enabled: bool) -> None:
    """diffusers' and transformers' "Loading pipeline components" / checkpoint-shard bars,
    on or off with the run's progress bars (``--no-progress``)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        if enabled:
            library.enable_progress_bar()
        else:
            library.disable_progress_bar()


def resolve_model_name(name: str) -> str:
    """A shipped model's folder for its alias; any other name unchanged."""
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return name
    if not (alias / "model_index.json").is_file():
        raise UserError(
            f"the '{name}' model is not in this installation ({alias} is missing): "
            f"reinstall lowvram-ddpo, or rebuild it with `python -m {POCKET_BUILDERS[name]}`"
        )
    return str(alias)


def quantization_config(quantize: str, dtype: torch.dtype):  # noqa: ANN201
    """diffusers' bitsandbytes config for a frozen UNet in int8 or nf4 (QLoRA style)."""
    from lowvram_ddpo.optimizers import bitsandbytes_usable

    if not bitsandbytes_usable():
        raise UserError(
            f"memory.quantize={quantize} needs a CUDA GPU and bitsandbytes "
            "(pip install 'lowvram-ddpo[bnb]'); set memory.quantize=none otherwise"
        )
    from diffusers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def use_attention(unet: UNet2DConditionModel, kind: str) -> None:
    """PyTorch SDPA is diffusers' default; xformers only when asked for and installed."""
    if kind != "xformers":
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as err:
        raise UserError(
            f"memory.attention=xformers failed ({str(err).splitlines()[0]}): install it with "
            "pip install 'lowvram-ddpo[xformers]' or use memory.attention=sdpa"
        ) from None


VAE_TILE_PIXELS = 512


def use_vae_tiling(vae: torch.nn.Module, enabled: bool, tile_pixels: int = VAE_TILE_PIXELS) -> None:
    """Decode in overlapping tiles of at most ``tile_pixels`` (512 px: diffusers tiles at
    the VAE's own sample size, which for SDXL is the whole 1024 px image), or not at all."""
    if not enabled:
        vae.disable_tiling()
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = vae_tile(vae, tile_pixels)
    vae.tile_latent_min_size = vae.tile_sample_min_size // vae_scale(vae)


def vae_tile(vae: torch.nn.Module, tile_pixels: int = VAE_TILE_PIXELS) -> int:
    """The side of ``vae``'s tiles at ``tile_pixels``: never above its own sample size."""
    return min(vae.config.sample_size, tile_pixels)


def vae_scale(vae: torch.nn.Module) -> int:
    """Pixels per latent along a side (8 for SD's VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tiling_would_split(vae: torch.nn.Module, pixels: int) -> bool:
    """Whether ``use_vae_tiling`` would decode an image ``pixels`` wide in several tiles."""
    return pixels > vae_tile(vae)


def tiles_as_configured(vae: torch.nn.Module) -> bool:
    """Whether ``vae`` tiles as ``memory.vae_tiling`` makes it (not in smaller tiles)."""
    return bool(getattr(vae, "use_tiling", False)) and vae.tile_sample_min_size == vae_tile(vae)


SMALLEST_VAE_TILE = 128
"""The smallest tile a decode that ran out of memory falls back to (pixels a side)."""


def fuse_lcm_lora(pipe: DiffusionPipeline, location: str) -> None:
    """Fold an LCM-LoRA (e.g. latent-consistency/lcm-lora-sdv1-5) into the UNet's weights
    and switch to the LCMScheduler: SD 1.5 becomes a few-step consistency model, and the RL
    LoRA is trained on top of it as on any base."""
    from diffusers import LCMScheduler

    path = Path(location).expanduser()
    folder, options = (path.parent, {"weight_name": path.name}) if path.is_file() else (path, {})
    source = str(folder) if path.exists() else location
    try:
        pipe.load_lora_weights(source, adapter_name="lcm", **options)
    except loading_errors() as err:
        raise UserError(
            f"could not load the LCM-LoRA '{location}' ({first_line(err)}); offline, "
            "download it first or give a local .safetensors file (model.lcm_lora)"
        ) from None
    pipe.fuse_lora(adapter_names=["lcm"])
    pipe.unload_lora_weights()  # the fused weights stay; no adapter left to confuse with ours
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)


def load_pipeline(
    name: str,
    dtype: torch.dtype = torch.float32,
    revision: str = "",
    quantize: str = "none",
    lcm_lora: str = "",
    use_t5: bool = True,
) -> DiffusionPipeline:
    """Load a Stable Diffusion (1.x/2.x, SDXL or 3.x: ``pipeline_class``) pipeline from a
    local folder, a hub id or a shipped alias (``pocket``, ``pocket-lcm``, ``pocket-flow``),
    without safety checker; with ``quantize`` int8 or nf4 the UNet's Linear weights are
    loaded in it (bitsandbytes; fp8 is the trainer's, after loading); ``lcm_lora`` fuses an
    LCM-LoRA into the UNet (SD 1.5 + LCM-LoRA as a few-step model); ``use_t5`` false
    leaves SD 3's T5 text encoder unloaded.

    Errors a user can fix (missing folder, not a diffusers folder, offline hub) become
    a one-line ``UserError``.
    """
    path = Path(resolve_model_name(name)).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path} is not a diffusers pipeline folder (no model_index.json): "
                "save one with pipeline.save_pretrained(folder) or pass a hub id"
            )
        source = str(path)
    elif _looks_like_path(name):
        raise UserError(f"model folder '{name}' does not exist: check the path given to --model")
    else:
        source = name
    if lcm_lora and quantize in BITSANDBYTES_QUANTIZE:
        raise UserError(
            f"model.lcm_lora cannot be fused into a UNet quantised by bitsandbytes: set "
            f"memory.quantize=fp8 or none instead of {quantize}"
        )
    pipe = _from_pretrained(name, source, dtype, revision, quantize, use_t5)
    if lcm_lora:
        fuse_lcm_lora(pipe, lcm_lora)
    return pipe


def pipeline_index(source: str, revision: str = "") -> dict:
    """The folder's (or hub repo's) ``model_index.json``: which component is which class."""
    with warnings.catch_warnings():  # a deprecation inside diffusers' own download call
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return dict(DiffusionPipeline.load_config(source, revision=revision or None))


def absent_components(index: dict) -> dict[str, None]:
    """Components saved as ``[null, null]`` (an SD 3.x folder without T5), which diffusers
    only accepts when they are passed as None."""
    return {name: None for name, value in index.items() if value == [None, None]}


def pipeline_class(source: str, revision: str = "") -> type[DiffusionPipeline]:
    """SD 3.x folders (a transformer, three text encoders) load as
    ``StableDiffusion3Pipeline``, FLUX.2-klein's as ``Flux2KleinPipeline``, SDXL folders
    (two text encoders) as ``StableDiffusionXLPipeline``; everything else (SD 1.x/2.x and
    the LCMs distilled from them) as ``StableDiffusionPipeline``."""
    index = pipeline_index(source, revision)
    if "transformer" in index:
        kind = index.get("_class_name", "a transformer model")
        if kind == flux2.PIPELINE_CLASS_NAME:
            return Flux2KleinPipeline
        if "text_encoder_3" not in index:
            raise UserError(
                f"'{source}' is {kind}: of the transformer (flow-matching) models only "
                "Stable Diffusion 3.x and FLUX.2-klein are supported so far"
            )
        return StableDiffusion3Pipeline
    if "text_encoder_2" not in index:
        return StableDiffusionPipeline
    if not index.get("text_encoder") or index["text_encoder"][0] is None:
        raise UserError(
            f"'{source}' looks like an SDXL refiner (no first text encoder): train a base "
            "model, e.g. stabilityai/stable-diffusion-xl-base-1.0"
        )
    return StableDiffusionXLPipeline


def load_quantized_unet(
    source: str,
    dtype: torch.dtype,
    quantize: str,
    subfolder: str = "unet",
    revision: str = "",
    model_class: type = UNet2DConditionModel,
) -> torch.nn.Module:
    """The denoiser (a UNet, or ``model_class``: SD 3's transformer) with its Linear
    weights in int8 or nf4 (bitsandbytes places it on the GPU)."""
    unet = model_class.from_pretrained(
        source,
        subfolder=subfolder or None,
        revision=revision or None,
        dtype=dtype,
        quantization_config=quantization_config(quantize, dtype),
    )
    cast_4bit_inputs_like_autocast(unet)
    return unet


def _is_bnb_4bit_linear(module: torch.nn.Module) -> bool:
    kind = type(module)
    return kind.__name__ == "Linear4bit" and kind.__module__.startswith("bitsandbytes")


def _to_autocast_dtype(layer: torch.nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    device = x.device.type
    if not (x.is_floating_point() and torch.is_autocast_enabled(device)):
        return None
    return (x.to(torch.get_autocast_dtype(device)), *args[1:])


def cast_4bit_inputs_like_autocast(model: torch.nn.Module) -> int:
    """Give bitsandbytes' 4-bit Linear layers an input in the autocast dtype, as autocast
    does for ``nn.Linear``. They return their output in their *input's* dtype, and under
    autocast that input is often fp32 (a LayerNorm's output, the time embedding): their
    activations, and what the next layers save for backward, then stay fp32 where an fp16
    base's are fp16. Measured on the CPU with bitsandbytes' real nf4 layers in an SD 1.5
    UNet: +0.62 GB at the training peak, +0.75 GB per sampling step; with this hook both
    equal the fp16 base's. Returns how many layers were hooked."""
    layers = [m for m in model.modules() if _is_bnb_4bit_linear(m)]
    for layer in layers:
        layer.register_forward_pre_hook(_to_autocast_dtype)
    return len(layers)


FLOW_TRANSFORMERS: dict[type, type] = {
    StableDiffusion3Pipeline: SD3Transformer2DModel,
    Flux2KleinPipeline: Flux2Transformer2DModel,
}
"""Each flow-matching pipeline's denoiser class."""


def _from_pretrained(
    name: str, source: str, dtype: torch.dtype, revision: str, quantize: str, use_t5: bool
) -> DiffusionPipeline:
    parts: dict[str, object] = {}
    try:
        cls = pipeline_class(source, revision)
        if cls is StableDiffusionXLPipeline:
            parts["add_watermarker"] = False  # we never call the pipeline: no extra package
        elif cls is StableDiffusion3Pipeline:
            parts |= absent_components(pipeline_index(source, revision))
            if not use_t5:  # never read from disk: 9.5 GB saved in fp16
                parts |= {"text_encoder_3": None, "tokenizer_3": None}
        elif cls is Flux2KleinPipeline:
            pass  # no safety checker, nothing optional
        else:
            parts |= {"safety_checker": None, "requires_safety_checker": False}
        bitsandbytes = quantize in BITSANDBYTES_QUANTIZE  # fp8 converts after loading
        if bitsandbytes and cls in FLOW_TRANSFORMERS:
            parts["transformer"] = load_quantized_unet(
                source, dtype, quantize, "transformer", revision, FLOW_TRANSFORMERS[cls]
            )
        elif bitsandbytes:
            parts["unet"] = load_quantized_unet(source, dtype, quantize, "unet", revision)
        pipe = cls.from_pretrained(source, dtype=dtype, revision=revision or None, **parts)
        return with_denoiser_as_unet(pipe)
    except loading_errors() as err:
        raise UserError(
            f"could not load model '{name}' ({first_line(err)}). If you are offline, download it "
            f"first (`hf download {name}`) or pass a local diffusers folder with --model"
        ) from None


def with_denoiser_as_unet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """An SD 3.x pipeline's denoiser is ``pipe.transformer``; it is also reachable as
    ``pipe.unet``, the name the trainer, offloader and checkpoints use for "the model the
    LoRA is on" (the flow policy calls it with SD3's own arguments)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and getattr(pipe, "unet", None) is None:
        object.__setattr__(pipe, "unet", transformer)  # not a pipeline component: no config
    return pipe


UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
"""Every attention projection of an SD 1.x/2.x/XL UNet (self- and cross-attention)."""
SD3_LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]  # fmt: skip
"""SD 3.x's joint attention, image and text (context) projections: Flow-GRPO's and
DiffusionNFT's targets (SD 3.5 Medium: 191 layers, 18.8 M parameters at rank 32)."""


def default_lora_targets(denoiser: torch.nn.Module) -> list[str]:
    """``model.lora_targets = []``: the targets this model family is trained with."""
    if flux2.is_flux2_transformer(denoiser):
        return flux2.lora_targets(denoiser)
    return SD3_LORA_TARGETS if is_flow_transformer(denoiser) else UNET_LORA_TARGETS


def is_flow_transformer(denoiser: torch.nn.Module) -> bool:
    """SD 3's or FLUX.2's transformer (not a UNet)."""
    name = type(denoiser).__name__
    return name == "SD3Transformer2DModel" or flux2.is_flux2_transformer(denoiser)


def make_trainable(
    unet: UNet2DConditionModel, rank: int, alpha: float, targets: list[str]
) -> list[torch.nn.Parameter]:
    """The parameters to train, in fp32: a LoRA adapter's (``rank`` >= 1; ``targets``
    empty: the model's default) or, with ``rank`` 0, every weight (full fine-tuning;
    autocast still runs in fp16/bf16)."""
    if rank == 0:
        unet.requires_grad_(True)
        for param in unet.parameters():
            param.data = param.data.float()
        return list(unet.parameters())
    return attach_lora(unet, rank, alpha, targets or default_lora_targets(unet))


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def attach_lora(
    unet: UNet2DConditionModel,
    rank: int,
    alpha: float,
    targets: list[str],
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter on the attention projections, return its fp32 params."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets
    )
    try:
        unet.add_adapter(config)
    except ValueError as err:  # peft's: no layer matches (NoMatchingPeftModuleError)
        if "not found" not in str(err):
            raise
        params = []
    else:
        params = trainable_parameters(unet)
    if not params:
        raise UserError(
            f"model.lora_targets {','.join(targets)} matches no layer of this model's "
            "denoiser: name its layers as peft does, e.g. to_q,to_k,to_v,to_out.0"
        )
    for param in params:
        param.data = param.data.float()
    return params


def adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming (what ``load_adapter_state_dict`` takes back)."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_adapter_state_dict(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint does not match the model: unexpected keys {unexpected[:3]}")
