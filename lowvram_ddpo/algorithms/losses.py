"""The paper's four objectives as plain functions of tensors.

DDPO-IS and DDPO-SF act on per-step log-probs; RWR and sparse RWR weight a
denoising (epsilon-MSE) loss on the model's own samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ppo_clip_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """DDPO-IS: PPO's clipped surrogate, ``mean(max(-A r, -A clip(r, 1-e, 1+e)))``."""
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    metrics = {
        "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
    }
    return loss, metrics


def score_function_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """DDPO-SF (REINFORCE): ``-mean(A log pi)``."""
    diff = (log_prob - old_log_prob).detach()
    metrics = {"approx_kl": 0.5 * (diff**2).mean()}  # nothing is clipped: no clip fraction
    return -(advantages * log_prob).mean(), metrics


def rwr_weights(advantages: Tensor, beta: float) -> Tensor:
    """RWR: ``softmax(beta * A) * N``, so the weights average to one."""
    return torch.softmax(beta * advantages.double(), dim=0).float() * advantages.numel()


def sparse_rwr_weights(advantages: Tensor, percentile: float) -> Tensor:
    """Sparse RWR: keep samples at or above the batch percentile, weights averaging to one."""
    threshold = torch.quantile(advantages.double(), percentile / 100.0)
    keep = (advantages.double() >= threshold).float()
    return keep * advantages.numel() / keep.sum()


def weighted_denoising_loss(
    prediction: Tensor, target: Tensor, weights: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """``mean_i w_i ||eps_theta - eps||^2`` (squared error averaged over latent dims)."""
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.ndim)))
    return (weights * per_sample).mean(), {}  # no log-probs: no KL or clip fraction to report
