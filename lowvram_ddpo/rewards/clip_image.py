"""CLIP's image preprocessing on tensors, shared by the CLIP-based rewards.

Done on the scorer's device instead of through PIL, so a batch is one call and the
score stays differentiable; a test checks it against transformers' CLIPImageProcessor.
Two ways to fit an image to the model's square: CLIP's own centre crop, and open_clip's
letterbox (``resize_longest_max``: the whole image, black bars), which HPS v2 uses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Fit = Literal["crop", "pad"]


def clip_preprocess(images: Tensor, size: int, fit: Fit = "crop") -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP's input [B, 3, size, size], normalised with CLIP's
    mean and std (fp32). ``fit="crop"``: shorter side to ``size`` (bicubic, antialiased),
    centre crop. ``fit="pad"``: longer side to ``size``, centred on black (zeros before
    normalising, as open_clip pads). Square images come out the same either way."""
    height, width = images.shape[-2:]
    if fit == "crop":
        scale = size / min(height, width)
        new = (max(size, round(height * scale)), max(size, round(width * scale)))
    else:
        scale = size / max(height, width)
        new = (max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale))))
    x = F.interpolate(images.float(), size=new, mode="bicubic", antialias=True)
    if fit == "crop":
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    else:
        pad_h, pad_w = size - new[0], size - new[1]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
