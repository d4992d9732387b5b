"""LoRA files other tools load: diffusers' layout and the kohya layout of the UIs.

- ``pytorch_lora_weights.safetensors`` (diffusers): what ``pipeline.load_lora_weights``
  and ``lowvram-ddpo sample`` read. It has no alpha field, so each layer's scale
  (``alpha / rank``) is folded into its ``lora_B``.
- ``lora_kohya.safetensors`` (kohya sd-scripts' layout, which A1111, Forge, ComfyUI and
  diffusers all load): ``lora_unet_<module path with _>.lora_down.weight`` (peft's
  ``lora_A``), ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (the trained alpha; the
  loaders scale by ``alpha / rank``), plus kohya's ``ss_*`` metadata that UIs display.
  Module paths are the diffusers UNet's, as kohya's own SD 1.5 trainer writes them;
  A1111 maps them to its own names, ComfyUI and diffusers read them directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    Flux2KleinPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from lowvram_ddpo import flux2
from lowvram_ddpo.atomic import write_atomic_with
from lowvram_ddpo.models import adapter_state_dict, is_flow_transformer

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"


def exported_lora_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter as diffusers-layout loaders apply it: each layer's scale (``lora_alpha /
    r``) folded into its ``lora_B``. A LoRA file that names no alpha is applied with alpha =
    rank, so folding makes them apply exactly the update that was trained (an unfolded rank
    8 / alpha 32 adapter would load at a quarter of its strength)."""
    state = adapter_state_dict(unet)
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:  # one: ours (an LCM-LoRA is fused, not kept)
            key = f"{name}.lora_B.weight"
            state[key] = state[key] * module.scaling[adapter]
    return state


def save_lora_for_diffusers(unet: torch.nn.Module, folder: Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights`` reads
    (SD, SDXL: ``unet.`` keys; SD 3.x, FLUX.2: ``transformer.`` keys), its alpha folded
    into the weights."""
    state = exported_lora_state(unet)
    options = dict(weight_name=LORA_WEIGHTS_NAME, safe_serialization=True)
    if is_flow_transformer(unet):  # their loaders read peft's own names (lora_A/lora_B)
        flux = flux2.is_flux2_transformer(unet)
        pipeline = Flux2KleinPipeline if flux else StableDiffusion3Pipeline
        pipeline.save_lora_weights(folder, transformer_lora_layers=state, **options)
    else:
        state = convert_state_dict_to_diffusers(state)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, **options)
    return Path(folder) / LORA_WEIGHTS_NAME


def has_kohya_layout(unet: torch.nn.Module) -> bool:
    """kohya's ``lora_unet_*`` names are for UNets (SD 1.x/2.x, SDXL); an SD 3.x LoRA is
    written in diffusers' layout only (ComfyUI and diffusers load that one)."""
    return isinstance(unet, UNet2DConditionModel)


PEFT_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft's adapter tensors (``<module>.lora_A.weight``/``lora_B``) renamed to kohya's
    (``lora_unet_<module with _>.lora_down.weight``/``lora_up``), with one ``alpha`` per
    module; the weights are not rescaled (the loaders apply ``alpha / rank``)."""
    kohya = {}
    for key, tensor in peft_state.items():
        suffix = next((s for s in PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"not a LoRA weight of peft's layout: {key}")
        module = "lora_unet_" + key[: -len(suffix)].replace(".", "_")
        kohya[module + PEFT_SUFFIXES[suffix]] = tensor.detach().float().cpu().contiguous()
        kohya[module + ".alpha"] = torch.tensor(float(alpha))
    return kohya


def kohya_base_model(unet: UNet2DConditionModel) -> str:
    """kohya's ``ss_base_model_version`` (UIs show it and filter on it), from the UNet's
    shape: SDXL's takes pooled text and size ids, SD 2's cross-attends to 1024 wide text."""
    if unet.config.addition_embed_type == "text_time":
        return "sdxl_base_v1-0"
    return "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"


def kohya_metadata(rank: int, alpha: float, base_model: str, epochs_done: int) -> dict[str, str]:
    """kohya's ``ss_*`` fields that UIs display (all strings, as safetensors wants)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_epoch": str(epochs_done),
        "ss_training_comment": "trained with lowvram-ddpo (reinforcement learning on a reward)",
    }
    if base_model:
        metadata["ss_base_model_version"] = base_model
    return metadata


def write_kohya_lora(
    peft_state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    path: Path,
    base_model: str = "",
    epochs_done: int = 0,
) -> Path:
    """Write the kohya-layout file at ``path`` (atomically: a kill leaves the old one)."""
    state = kohya_state_dict(peft_state, alpha)
    metadata = kohya_metadata(rank, alpha, base_model, epochs_done)
    write_atomic_with(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def lora_rank_and_alpha(unet: UNet2DConditionModel) -> tuple[int, float]:
    """The rank and alpha of the UNet's (one) adapter."""
    config = next(iter(unet.peft_config.values()))
    return int(config.r), float(config.lora_alpha)


def save_kohya_lora(unet: UNet2DConditionModel, folder: Path, epochs_done: int) -> Path:
    rank, alpha = lora_rank_and_alpha(unet)
    path = Path(folder) / KOHYA_WEIGHTS_NAME
    base = kohya_base_model(unet)
    return write_kohya_lora(adapter_state_dict(unet), rank, alpha, path, base, epochs_done)
