"""The optimiser: bitsandbytes' 8-bit AdamW where it can run, torch's AdamW otherwise."""

from __future__ import annotations

import importlib.util

import torch

from lowvram_ddpo.config import TrainConfig


def bitsandbytes_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def build_optimizer(
    params: list[torch.nn.Parameter], train: TrainConfig, kind: str
) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, the kind actually used). ``adamw8bit`` falls back to ``adamw`` with a
    one-line notice where bitsandbytes or CUDA is missing."""
    options = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )
    if kind == "adamw8bit":
        if bitsandbytes_usable():
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **options), "adamw8bit"
        print(
            "note: 8-bit AdamW needs bitsandbytes and a CUDA GPU "
            "(pip install 'lowvram-ddpo[bnb]'); using torch AdamW"
        )
    # fused: one kernel for the whole update, no full-size temporaries on the GPU
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **options), "adamw"
