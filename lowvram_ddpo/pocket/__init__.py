"""The pocket models shipped in the package: tiny real Stable Diffusion pipelines trained on
a procedural world of 32x32 shapes (``world``), to run everything offline on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pocket_folder(name: str = "pocket") -> Path:
    """The diffusers folder of a shipped model (``pocket`` or ``pocket-lcm``), for
    ``StableDiffusionPipeline.from_pretrained`` or any other diffusers loader."""
    from lowvram_ddpo.models import resolve_model_name

    return Path(resolve_model_name(name))


def save_pipeline_half(pipe, folder: Path) -> None:  # noqa: ANN001  (a diffusers pipeline)
    """Save the weights in fp16 (half the bytes) while every loader still loads the whole
    pipeline in one dtype: diffusers loads its models in fp32 unless told otherwise, but
    transformers 5 loads a text encoder in the dtype its config names, which would leave
    an fp16 text encoder beside an fp32 UNet (a dtype error in plain diffusers)."""
    pipe.to(torch.float16).save_pretrained(folder)
    for config_path in Path(folder).glob("text_encoder*/config.json"):  # SD3 has two
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
