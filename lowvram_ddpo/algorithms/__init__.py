"""Algorithms: advantages (per-prompt statistics) and the losses of the four methods."""

from lowvram_ddpo.algorithms.advantages import (
    PerPromptStatTracker,
    clip_advantages,
    group_advantages,
)
from lowvram_ddpo.algorithms.losses import (
    ppo_clip_loss,
    rwr_weights,
    score_function_loss,
    sparse_rwr_weights,
    weighted_denoising_loss,
)
from lowvram_ddpo.config import POLICY_GRADIENT

REWARD_WEIGHTED = ("rwr", "sparse-rwr")

__all__ = [
    "POLICY_GRADIENT",
    "REWARD_WEIGHTED",
    "PerPromptStatTracker",
    "clip_advantages",
    "group_advantages",
    "ppo_clip_loss",
    "rwr_weights",
    "score_function_loss",
    "sparse_rwr_weights",
    "weighted_denoising_loss",
]
