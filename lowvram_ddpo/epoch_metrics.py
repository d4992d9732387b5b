"""The numbers an epoch reports about its training pass, and how they are printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowvram_ddpo.config import Config

FROM_THE_START = ("kl_to_base", "nft_positive", "nft_negative")
"""Metrics that mean something before the epoch's first optimiser step (the distance to
the base model: zero at the start of training, not by construction within an epoch;
DiffusionNFT's two losses)."""


REPLAY_SHOWN = 0.01
"""The share of the clip range from which the epoch line shows the replay's miss."""
REPLAY_WARNED = 0.1
"""The share of the clip range from which the run says the replay is not exact."""


@dataclass
class TrainingTotals:
    """An epoch's training metrics, averaged. ``approx_kl`` and ``clipfrac`` compare the
    policy with the one that sampled: they are averaged over the micro-steps after the
    epoch's first optimiser step, and are None ("n/a") when there were none (one
    optimiser step per epoch) or the objective has none.

    Before that step the weights are the ones that sampled, and the same two numbers
    measure the replay instead: the log-probs re-scored in the training path against the
    stored ones (``replay_rms``, their root-mean-square difference, each micro-step
    weighted alike, and ``replay_clipfrac``, the actions clipped by it alone). Exact
    replay gives 0; a speed path or a micro-batch that computes with other kernels than
    sampling did shows here, measured on the run itself at no extra compute, over the
    first optimiser step's samples and timesteps (the presets': a quarter of an epoch)."""

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
            elif name in ("approx_kl", "clipfrac"):
                self.add(f"replay_{name}", value)

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
        return result | self.replay()

    def replay(self) -> dict[str, float | None]:
        """``replay_rms`` and ``replay_clipfrac`` (None where the objective has none)."""
        kl, clipped = (self.sums.get(f"replay_{name}") for name in ("approx_kl", "clipfrac"))
        mean_kl = None if kl is None else float(kl) / self.counts["replay_approx_kl"]
        return {
            "replay_rms": None if mean_kl is None else math.sqrt(2 * mean_kl),  # kl = d^2 / 2
            "replay_clipfrac": (
                None if clipped is None else float(clipped) / self.counts["replay_clipfrac"]
            ),
        }


def _replay_measured(metrics: dict) -> float | None:
    """The epoch's finite replay miss where its objective clips a ratio, else None (a
    diverged micro-step's NaN is the divergence guard's to report)."""
    rms = metrics.get("replay_rms")
    if rms is None or metrics.get("replay_clipfrac") is None or not math.isfinite(rms):
        return None
    return rms


def replay_miss(metrics: dict, clip_range: float) -> str:
    """The epoch line's piece for a replay that missed by ``REPLAY_SHOWN`` of the clip
    range or more ("" when closer, or when the objective clips nothing)."""
    rms = _replay_measured(metrics)
    if rms is None or rms < REPLAY_SHOWN * clip_range:
        return ""
    return f"  replay {rms:.1e}"


def replay_warning(metrics: dict, config: Config) -> str:
    """One line when the epoch's replay missed by ``REPLAY_WARNED`` of the clip range or
    clipped an action ("" otherwise, or when the objective clips nothing), with the
    likely cause for ``config``."""
    rms, clip_range = _replay_measured(metrics), config.train.clip_range
    clipped = metrics.get("replay_clipfrac") or 0.0
    if rms is None or (rms < REPLAY_WARNED * clip_range and clipped == 0):
        return ""
    s, t = config.sample, config.train
    if t.batch_size != s.batch_size:
        cause = (
            f"training re-scores {t.batch_size} at a time what sampling computed "
            f"{s.batch_size} at a time, with other kernels; equal batches replay exactly "
            "(measured on an H100)"
        )
    else:
        cause = (
            f"sampling and training ran other kernels at equal batches (speed.compile="
            f"{config.speed.compile}); `lowvram-ddpo bench speed` reports each setting's "
            "replay: please report the line"
        )
    return (
        f"note: this epoch's replay is not exact: re-scored before the first update, the "
        f"log-probs differ from the sampled ones by {rms:.1e} rms ({rms / clip_range:.2f} of "
        f"the clip range {clip_range:g}; {clipped:.1%} of those actions clipped by rounding "
        f"alone): {cause}"
    )


def format_metric(value: float | None, spec: str) -> str:
    """A metric for the epoch line; "n/a" where there is nothing to report yet."""
    return "n/a" if value is None else format(value, spec)
