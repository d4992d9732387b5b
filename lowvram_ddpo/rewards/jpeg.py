"""JPEG (in)compressibility, as in the DDPO paper: the file size at quality 95, in kB."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from lowvram_ddpo.rewards.base import register_reward


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def jpeg_size_kb(image: Tensor, quality: int = 95) -> float:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def jpeg_sizes(images: Tensor) -> Tensor:
    return torch.tensor([jpeg_size_kb(image) for image in images], dtype=torch.float32)


class _JpegReward:
    """CPU only, no network: the config and dtype are not needed."""

    def __init__(self, config: object = None, dtype: object = None) -> None:
        pass


@register_reward("jpeg_incompressibility", "JPEG file size in kB (bigger is better)")
class JpegIncompressibility(_JpegReward):
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return jpeg_sizes(images)


@register_reward("jpeg_compressibility", "minus the JPEG file size in kB (smaller files win)")
class JpegCompressibility(_JpegReward):
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return -jpeg_sizes(images)
