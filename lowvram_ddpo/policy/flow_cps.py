"""Coefficients-preserving sampling (CPS; Wang & Yu 2025, arXiv 2509.05952) as a Gaussian
policy: Flow-GRPO's recommended sampler since 2025-10 ("noise level 0.8 works well without
tuning for different models or step counts").

Flow-GRPO's SDE (``flow_sde.py``) adds more noise than a few large steps remove: its
images stay visibly noisy at 10 steps. CPS instead keeps ``x_next`` on the flow's own
interpolation: with the step's estimates ``x0 = x - sigma v`` and ``noise = x + (1 - sigma) v``,

    std  = sigma_next sin(a pi / 2)
    mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) noise
    x_next ~ N(mean, std^2 I)

so ``x_next``'s signal and noise coefficients are exactly ``1 - sigma_next`` and
``sigma_next`` (the fresh noise replaces part of the predicted one). At ``a = 0`` it is
the Euler step; the last step (``sigma_next = 0``) is deterministic. The formulas are
Flow-GRPO's ``sde_type == "cps"`` (``sd3_sde_with_logprob.py``; docs/research/
flow_matching.md section 1). Its log-prob there drops the ``1 / (2 std^2)`` factor; this
one is the exact Gaussian log-prob, averaged over dims like every policy's here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy.flow_sde import FlowSDEPolicy

CPS_NOISE_LEVEL = 0.8
"""Flow-GRPO's noise level for CPS (its README and ``*_fast_nocfg`` configs)."""


class FlowCPSPolicy(FlowSDEPolicy):
    """x_next ~ N((1 - s') x0 + s' cos(a pi/2) noise, (s' sin(a pi/2))^2 I) over a
    flow-matching schedule; the Euler step where it samples nothing."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003  (FlowSDEPolicy's)
        super().__init__(*args, **kwargs)
        if self.noise_level > 1:
            raise UserError(
                f"sample.noise_level must be in (0, 1] for the cps sampler (got "
                f"{self.noise_level}; its std is sigma sin(a pi / 2); Flow-GRPO uses "
                f"{CPS_NOISE_LEVEL})"
            )

    def _coefficients(self, sigmas: Tensor) -> Tensor:
        """[T, 5] (sigma, mean coefficient of x, of v, std, dt) per step, in float64 and
        rounded to fp32 once: the mean is linear in x and v, as the SDE's."""
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        angle = self.noise_level * math.pi / 2
        std = sigma_next * math.sin(angle)
        kept = sigma_next * math.cos(angle)  # sqrt(sigma_next^2 - std^2)
        # (1 - s') (x - s v) + kept (x + (1 - s) v)
        x_coef = (1 - sigma_next) + kept
        v_coef = -sigma * (1 - sigma_next) + kept * (1 - sigma)
        return torch.stack([sigma, x_coef, v_coef, std, sigma_next - sigma], dim=1).float()

    def trainable_steps(self) -> int:
        """All but the last two: the last samples nothing, and the one before it lands on
        the last noise level (SD 3.5's 10 steps: std 0.0085), as sharp as the SDE's last
        step that is never trained (0.0063). Flow-GRPO samples CPS in a window in the first
        half only."""
        return max(1, len(self._timesteps) - 2)

    def stochastic_steps(self, generator: torch.Generator | None) -> range:
        """As the SDE's, less the last step: its std is 0 (``sigma_next = 0``)."""
        steps = super().stochastic_steps(generator)
        last = len(self._timesteps) - 1
        return range(steps.start, min(steps.stop, last))
