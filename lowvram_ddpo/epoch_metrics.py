"""The numbers an epoch reports about its training pass, and how they are printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FROM_THE_START = ("kl_to_base", "nft_positive", "nft_negative")
"""Metrics that mean something before the epoch's first optimiser step (the distance to
the base model: zero at the start of training, not by construction within an epoch;
DiffusionNFT's two losses)."""


@dataclass
class TrainingTotals:
    """An epoch's training metrics, averaged. ``approx_kl`` and ``clipfrac`` compare the
    policy with the one that sampled, so before the epoch's first optimiser step they are
    zero by construction: they are averaged over the micro-steps after it, and are None
    ("n/a") when there were none (one optimiser step per epoch) or the objective has none."""

    sums: dict[str, float | torch.Tensor] = field(default_factory=dict)
    """Running sums; per-micro-step values stay on the device (adding them there costs
    no wait on the GPU; ``means`` reads them back once per epoch)."""
    counts: dict[str, int] = field(default_factory=dict)
    policy_moved: bool = False
    micro_steps: int = 0
    optimizer_steps: int = 0

    def add(self, name: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_micro_step(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        self.micro_steps += 1
        self.add("loss", loss)
        for name, value in metrics.items():
            if self.policy_moved or name in FROM_THE_START:
                self.add(name, value)

    def add_optimizer_step(self, grad_norm: float) -> None:
        """A finite norm means the step was taken (a non-finite one is skipped)."""
        if math.isfinite(grad_norm):
            self.add("grad_norm", grad_norm)
            self.optimizer_steps += 1
            self.policy_moved = True

    def means(self) -> dict[str, float | int | None]:
        names = ("loss", "approx_kl", "clipfrac", "grad_norm")
        names += tuple(name for name in FROM_THE_START if name in self.counts)  # when logged
        result: dict[str, float | int | None] = {
            name: float(self.sums[name]) / self.counts[name] if self.counts.get(name) else None
            for name in names
        }
        result |= {"optimizer_steps": self.optimizer_steps, "micro_steps": self.micro_steps}
        return result


def format_metric(value: float | None, spec: str) -> str:
    """A metric for the epoch line; "n/a" where there is nothing to report yet."""
    return "n/a" if value is None else format(value, spec)
