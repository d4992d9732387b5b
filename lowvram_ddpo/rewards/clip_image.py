"""CLIP's image preprocessing on tensors, shared by the CLIP-based rewards.

Done on the scorer's device instead of through PIL, so a batch is one call and the
score stays differentiable; a test checks it against transformers' CLIPImageProcessor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP's input: shorter side to ``size`` (bicubic,
    antialiased), centre crop, normalised with CLIP's mean and std (fp32)."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    x = F.interpolate(images.float(), size=new, mode="bicubic", antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
