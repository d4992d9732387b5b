"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): reinforcement on the forward process.

No log-probs and no stored trajectory steps: each sample's final clean latent ``x0`` and
its reward are all the training pass reads. A sample is re-noised at one of the sampler's
noise levels, ``x_s = (1 - s) x0 + s noise``, and the velocity the LoRA predicts, ``v``,
is mixed with the sampling policy's, ``v_old``, into two implicit policies:

    v+ = beta v + (1 - beta) v_old        (pulled towards x0 for good samples)
    v- = (1 + beta) v_old - beta v        (pulled towards x0 for bad ones)

each scored by its x0 error ``x_s - s v`` normalised by its own (detached) mean absolute
error, weighted by the sample's optimality ``r = clip(A / A_max / 2 + 1/2, 0, 1)``. The
sampling policy ("old") is a second set of LoRA weights that follows the trained one once
per epoch (an EMA whose decay grows with the steps taken). The formulas are NVlabs/
DiffusionNFT's ``train_nft_sd3.py`` (docs/research/flow_matching.md section 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowvram_ddpo.errors import UserError

MIN_ERROR = 1e-5
"""The adaptive weights' floor (DiffusionNFT's ``clip(min=1e-5)``)."""


def optimality(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT's r in [0, 1]: 1/2 for an average sample, 1 at +adv_clip_max."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0, 1)


def _normalised_x0_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """[B] mean squared x0 error over its own detached mean absolute error."""
    dims = tuple(range(1, x0.ndim))
    error = x0_hat.double() - x0.double()
    weight = error.abs().mean(dim=dims).detach().clamp(min=MIN_ERROR)
    return (error**2).mean(dim=dims) / weight


def nft_objective(
    velocity: Tensor,
    old_velocity: Tensor,
    noisy: Tensor,
    x0: Tensor,
    sigma: Tensor,
    r: Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The NFT loss of a micro-batch (``sigma`` broadcastable to the latents, ``r`` [B])."""
    old = old_velocity.detach()
    positive = beta * velocity + (1 - beta) * old
    negative = (1 + beta) * old - beta * velocity
    loss_positive = _normalised_x0_error(noisy - sigma * positive, x0)
    loss_negative = _normalised_x0_error(noisy - sigma * negative, x0)
    per_sample = (r * loss_positive + (1 - r) * loss_negative) / beta
    metrics = {"nft_positive": loss_positive.mean().detach(), "nft_negative": loss_negative.mean()}
    return (per_sample.mean() * adv_clip_max).float(), {k: v.detach() for k, v in metrics.items()}


def old_policy_decay(optimizer_steps: int) -> float:
    """How much of itself the sampling policy keeps at an update: 0 at first (it becomes
    the trained LoRA), growing by 0.001 per optimiser step to 0.5 (DiffusionNFT's decay
    type 1, its default)."""
    return min(0.001 * optimizer_steps, 0.5)


class SamplingWeights:
    """The sampling ("old") policy: a copy of the trained LoRA weights, swapped into the
    model while it samples or predicts ``v_old`` (no second adapter, no second model)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.weights = [p.detach().clone() for p in params]

    @contextmanager
    def in_use(self) -> Iterator[None]:
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, w in zip(self.params, self.weights, strict=True):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.params, current, strict=True):
                    p.copy_(c)

    @torch.no_grad()
    def follow(self, decay: float) -> None:
        """``old = decay * old + (1 - decay) * trained``, after an epoch's training."""
        for w, p in zip(self.weights, self.params, strict=True):
            w.mul_(decay).add_(p.detach(), alpha=1 - decay)

    def state(self) -> dict[str, Tensor]:
        return {f"nft_old.{i}": w.cpu() for i, w in enumerate(self.weights)}

    def load(self, state: dict[str, Tensor]) -> None:
        shapes = [
            tuple(state.get(f"nft_old.{i}", torch.empty(0)).shape) for i in range(len(self.weights))
        ]
        if len(state) != len(self.weights) or shapes != [tuple(w.shape) for w in self.weights]:
            raise UserError(
                "the checkpoint's DiffusionNFT sampling weights do not match this LoRA "
                "(another rank or targets?): resume with the run's own settings"
            )
        for i, w in enumerate(self.weights):
            w.copy_(state[f"nft_old.{i}"])
