"""Rectified-flow sampling as a Gaussian policy: Flow-GRPO's SDE (Liu et al. 2025).

A flow-matching model (SD 3.x, FLUX) predicts the velocity ``v = noise - x0`` of
``x_sigma = (1 - sigma) x0 + sigma noise``; its sampler integrates the ODE
``x_next = x + (sigma_next - sigma) v`` (diffusers' FlowMatchEulerDiscreteScheduler).
The ODE has no randomness to explore with, so Flow-GRPO samples from an SDE with the same
marginals instead: with ``dt = sigma_next - sigma < 0`` and a noise level ``a``,

    s_t  = a * sqrt(sigma / (1 - sigma))            (at sigma = 1: the next sigma inside)
    mean = x (1 + s_t^2 dt / (2 sigma)) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
    x_next ~ N(mean, s_t^2 |dt| I)

As ``a`` goes to 0 the mean is the Euler step and the noise vanishes. The formulas are
Flow-GRPO's ``sde_step_with_logprob`` (yifan123/flow_grpo, ``sd3_sde_with_logprob.py``;
docs/research/flow_matching.md section 1); the log-prob is the exact Gaussian one,
averaged over dims like every policy's here.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lowvram_ddpo import flux2
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy.base import Conditioning, DeviceTable, GaussianStep, PolicyStep

DEFAULT_NOISE_LEVEL = 0.7
"""Flow-GRPO's ``sample.noise_level`` for SD 3.5 (config/base.py)."""


def flow_model_output(
    transformer: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
) -> Tensor:
    """The velocity from one transformer pass (SD 3's keyword call, or FLUX.2's through
    ``flux2.velocity``); with classifier-free guidance the batch is doubled inside,
    negative rows first, as diffusers does."""
    guided = cond.guided
    hidden, pooled = cond.embeddings(doubled=guided)
    if guided:
        latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
    if flux2.is_flux2_transformer(transformer):
        out = flux2.velocity(transformer, latents, timesteps, hidden).float()
    else:
        out = transformer(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample.float()
    if not guided:
        return out
    uncond, text = out.chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


def is_flow_matching(scheduler_config: dict) -> bool:
    """A flow-matching scheduler's config (saved ones name their class; ones built in
    code are known by the shift settings only flow-matching schedulers have)."""
    name = str(scheduler_config.get("_class_name", ""))
    return name.startswith("FlowMatch") or "use_dynamic_shifting" in scheduler_config


def flow_schedule(
    scheduler_config: dict, num_steps: int, image_tokens: int = 0
) -> tuple[Tensor, Tensor]:
    """(timesteps [T], sigmas [T + 1] ending at 0) of diffusers' flow-matching Euler
    sampler for ``num_steps`` steps (the shift of the model's scheduler applied; FLUX.2's
    shift depends on the image's ``image_tokens``)."""
    if scheduler_config.get("use_dynamic_shifting"):
        return flux2.shifted_timesteps(scheduler_config, num_steps, image_tokens)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.float().clone(), scheduler.sigmas.double().clone()


class FlowSDEPolicy(PolicyStep):
    """x_next ~ N(mean, s_t^2 |dt| I), Flow-GRPO's SDE over a flow-matching schedule."""

    def __init__(
        self,
        scheduler_config: dict,
        num_steps: int,
        noise_level: float = DEFAULT_NOISE_LEVEL,
        window: int = 0,
        ode: bool = False,
        image_tokens: int = 0,
    ) -> None:
        if noise_level <= 0:
            raise UserError(
                "sample.noise_level must be > 0: at 0 the flow sampler is deterministic "
                f"(Flow-GRPO uses {DEFAULT_NOISE_LEVEL})"
            )
        self.noise_level = noise_level
        self.window = window
        """Flow-GRPO-Fast: only this many consecutive steps sample (0: all)."""
        self.ode = ode
        """Every step the Euler (ODE) step: how diffusers and the UIs sample."""
        self._config, self._num_steps = scheduler_config, num_steps
        self._image_tokens = image_tokens
        """The latent image's token count: FLUX.2's schedule depends on it."""
        self._timesteps, sigmas = flow_schedule(scheduler_config, num_steps, image_tokens)
        self._schedule = DeviceTable(self._timesteps.clone())
        self._tables = DeviceTable(self._coefficients(sigmas))

    def timesteps(self) -> Tensor:
        return self._timesteps.clone()

    def _coefficients(self, sigmas: Tensor) -> Tensor:
        """[T, 5] (sigma, mean coefficient of x, of v, std, dt) per step, computed in
        float64 and rounded to fp32 once."""
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        dt = sigma_next - sigma
        # at sigma = 1 the SDE's s_t is infinite: Flow-GRPO puts the next sigma inside
        inner = torch.where(sigma >= 1.0, sigmas[1], sigma)
        s_t = self.noise_level * (sigma / (1 - inner)).sqrt()
        x_coef = 1 + s_t**2 / (2 * sigma) * dt
        v_coef = (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s_t * (-dt).sqrt()
        return torch.stack([sigma, x_coef, v_coef, std, dt], dim=1).float()

    def step_coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(sigma, x coefficient, v coefficient, std), each [B, 1, 1, 1] fp32, for timesteps
        of this schedule: found on the device (nearest entry), never waiting on the host."""
        rows = self._tables.on(timesteps.device)[self._index(timesteps)]
        return tuple(rows[:, i].view(-1, 1, 1, 1) for i in range(4))  # type: ignore[return-value]

    def _index(self, timesteps: Tensor) -> Tensor:
        """Each timestep's step in the schedule (the nearest entry, found on the device)."""
        schedule = self._schedule.on(timesteps.device)
        return (timesteps.float()[:, None] - schedule[None, :]).abs().argmin(dim=1)

    def for_viewing(self) -> FlowSDEPolicy:
        """The ODE sampler (as Flow-GRPO evaluates, and as diffusers and the UIs sample):
        grids and evaluations show the images a user will get."""
        tokens = self._image_tokens
        return FlowSDEPolicy(
            self._config, self._num_steps, self.noise_level, ode=True, image_tokens=tokens
        )

    def trainable_steps(self) -> int:
        """All but the last: its Gaussian (sigma 0.009 -> 0) is so sharp that its log-prob
        ratio is numerically unreliable, and Flow-GRPO never trains it."""
        return len(self._timesteps) - 1

    def stochastic_steps(self, generator: torch.Generator | None) -> range:
        """Flow-GRPO-Fast's window: ``window`` steps from a start drawn uniformly in
        [0, T // 2 - window] (its ``sde_window_range = (0, T // 2)``), the same for a
        batch; every step without a window."""
        steps = len(self._timesteps)
        if self.ode:
            return range(0)
        if self.window == 0:
            return range(steps)
        last_start = steps // 2 - self.window
        start = int(torch.randint(last_start + 1, (1,), generator=generator))
        return range(start, start + self.window)

    def deterministic_step(self, step: GaussianStep, latents: Tensor, timesteps: Tensor) -> Tensor:
        """The Euler (ODE) step, ``x + dt v``, from the step's own velocity estimate."""
        sigma, dt = self.sigma_and_dt(timesteps.to(latents.device))
        velocity = (latents.float() - step.denoised) / sigma
        return latents.float() + dt * velocity

    def sigma_and_dt(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 1, 1, 1] sigma and dt (< 0) of each timestep's step."""
        rows = self._tables.on(timesteps.device)[self._index(timesteps)]
        return rows[:, 0].view(-1, 1, 1, 1), rows[:, 4].view(-1, 1, 1, 1)

    def __call__(
        self, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
    ) -> GaussianStep:
        latents = latents.float()
        timesteps = timesteps.to(latents.device)
        velocity = flow_model_output(unet, latents, timesteps, cond)
        sigma, x_coef, v_coef, std = self.step_coefficients(timesteps)
        mean = x_coef * latents + v_coef * velocity
        return GaussianStep(mean=mean, std=std, denoised=latents - sigma * velocity)
