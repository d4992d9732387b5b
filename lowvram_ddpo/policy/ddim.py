"""DDIM with eta > 0 as a Gaussian policy (DDPO, Black et al. 2023)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy.base import Conditioning, DeviceTable, GaussianStep, PolicyStep


def guided_model_output(
    unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
) -> Tensor:
    """One UNet pass; with classifier-free guidance the batch is doubled inside."""
    if not cond.guided:
        return unet(latents, timesteps, **cond.unet_kwargs()).sample.float()
    out = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        **cond.unet_kwargs(doubled=True),
    ).sample.float()
    uncond, text = out.chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


class DDIMPolicy(PolicyStep):
    """x_prev ~ N(mean, sigma_t^2 I) with DDIM's mean and sigma_t = eta * DDPM sigma."""

    def __init__(self, scheduler_config: dict, num_steps: int, eta: float = 1.0) -> None:
        if eta <= 0:
            raise UserError("DDIM eta must be > 0: at eta = 0 the step is deterministic")
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.eta = eta
        self.prediction_type = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)
        self.scheduler.set_timesteps(num_steps)
        self._timesteps = self.scheduler.timesteps.clone()
        # diffusers' DDIM rule for the previous timestep of the schedule
        self.step_size = self.scheduler.config.num_train_timesteps // num_steps
        every_timestep = torch.arange(self.scheduler.config.num_train_timesteps)
        self._tables = DeviceTable(self._coefficients(every_timestep))

    def timesteps(self) -> Tensor:
        return self._timesteps.clone()

    def _coefficients(self, timesteps: Tensor) -> Tensor:
        """[T, 3] (abar_t, abar_prev, sigma) for every training timestep, computed in float64
        and rounded to fp32 once, exactly as a per-step computation would round them."""
        t = timesteps.long()
        prev = t - self.step_size
        abar_t = self.alphas_cumprod[t]
        abar_prev = torch.where(
            prev >= 0,
            self.alphas_cumprod[prev.clamp(min=0)],
            torch.full_like(abar_t, self.final_alpha_cumprod),
        )
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = self.eta * variance.sqrt()
        return torch.stack([abar_t, abar_prev, sigma], dim=1).float()

    def step_coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(abar_t, abar_prev, sigma), each [B, 1, 1, 1] fp32 on ``timesteps``' device: looked
        up in a table that moves to each device once, so a step never waits on the host."""
        table = self._tables.on(timesteps.device)
        rows = table[timesteps.long()]
        return tuple(rows[:, i].view(-1, 1, 1, 1) for i in range(3))  # type: ignore[return-value]

    def split_prediction(
        self, output: Tensor, latents: Tensor, abar_t: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the model output, whatever it predicts."""
        a, s = abar_t.sqrt(), (1 - abar_t).sqrt()
        if self.prediction_type == "epsilon":
            return (latents - s * output) / a, output
        if self.prediction_type == "v_prediction":
            return a * latents - s * output, a * output + s * latents
        if self.prediction_type == "sample":
            return output, (latents - a * output) / s
        raise UserError(f"unsupported scheduler prediction_type '{self.prediction_type}'")

    def __call__(
        self, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
    ) -> GaussianStep:
        latents = latents.float()
        timesteps = timesteps.to(latents.device)
        output = guided_model_output(unet, latents, timesteps, cond)
        abar_t, abar_prev, sigma = self.step_coefficients(timesteps)
        x0, eps = self.split_prediction(output, latents, abar_t)
        direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        mean = abar_prev.sqrt() * x0 + direction
        return GaussianStep(mean=mean, std=sigma, denoised=x0)
