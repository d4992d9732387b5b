"""Multistep consistency sampling as a Gaussian policy (RLCM, Oertell et al. 2024).

At each of H steps the latent consistency model maps ``x_t`` to a clean estimate,
``denoised = c_out * x0_pred + c_skip * x_t`` (LCMScheduler's boundary condition), and
the sampler re-noises it to the next level: ``x_prev ~ N(sqrt(abar_prev) * denoised,
(1 - abar_prev) I)``. That re-noising is the policy's randomness, so the same PPO
objective as DDPO applies. The last step is noised at its own level, so that it stays a
stochastic action; the image the reward sees is decoded from ``denoised``.

Guidance goes through the model's guidance embedding (``time_cond_proj_dim``): one UNet
pass per step, no classifier-free doubling. A UNet without that embedding (SD 1.5 with
an LCM-LoRA) uses classifier-free guidance instead, when asked for.
"""

from __future__ import annotations

import math

import torch
from diffusers import LCMScheduler
from torch import Tensor

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy.base import Conditioning, DeviceTable, GaussianStep, PolicyStep
from lowvram_ddpo.policy.ddim import guided_model_output

ORIGINAL_STEPS = 50
"""The grid LCMs are distilled on: t in {19, 39, ..., 999} for 1000 training steps."""


def rlcm_timesteps(steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """RLCM's schedule: ``origin[::-(50 // H)][:H]`` over origin = {19, 39, ..., 999}
    (H = 8: 999, 879, ..., 159)."""
    k = num_train_timesteps // ORIGINAL_STEPS
    origin = torch.arange(1, ORIGINAL_STEPS + 1) * k - 1
    return origin.flip(0)[:: ORIGINAL_STEPS // steps][:steps].clone()


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the guidance weight w (= guidance scale - 1), as
    diffusers' LatentConsistencyModelPipeline makes it."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding


def boundary_scalings(t: Tensor, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCMScheduler: the consistency function is exact at t = 0."""
    scaled = t.double() * timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    return c_skip.float().view(-1, 1, 1, 1), c_out.float().view(-1, 1, 1, 1)


class LCMPolicy(PolicyStep):
    def __init__(self, scheduler_config: dict, num_steps: int) -> None:
        if num_steps < 2 or num_steps > ORIGINAL_STEPS:
            raise UserError(
                f"an LCM policy needs 2 to {ORIGINAL_STEPS} steps (got {num_steps}); "
                "RLCM uses 2-8 (16 for prompt alignment)"
            )
        self.scheduler = LCMScheduler.from_config(scheduler_config)
        config = self.scheduler.config
        self.prediction_type = config.prediction_type
        self.timestep_scaling = float(config.timestep_scaling)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self._timesteps = rlcm_timesteps(num_steps, config.num_train_timesteps)
        # each step re-noises to the next level; the last one to its own level
        following = torch.cat([self._timesteps[1:], self._timesteps[-1:]])
        self._tables = DeviceTable(self._coefficients(following, config.num_train_timesteps))
        self._guidance: dict[tuple, Tensor] = {}

    def _coefficients(self, following: Tensor, num_train_timesteps: int) -> Tensor:
        """[T, 4] (abar_t, abar_next, c_skip, c_out) per training timestep, computed in
        float64 and rounded to fp32 once; NaN rows for timesteps outside the schedule."""
        every = torch.arange(num_train_timesteps)
        c_skip, c_out = boundary_scalings(every, self.timestep_scaling)
        abar_next = torch.full((num_train_timesteps,), float("nan"), dtype=torch.float64)
        abar_next[self._timesteps] = self.alphas_cumprod[following]
        columns = [
            self.alphas_cumprod.float(),
            abar_next.float(),
            c_skip.flatten(),
            c_out.flatten(),
        ]
        return torch.stack(columns, dim=1)

    def timesteps(self) -> Tensor:
        return self._timesteps.clone()

    def model_output(
        self, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
    ) -> Tensor:
        dim = unet.config.time_cond_proj_dim
        if dim is None:  # e.g. SD 1.5 + LCM-LoRA: guidance, if any, is classifier-free
            return guided_model_output(unet, latents, timesteps, cond)
        embedding = self.guidance_embedding_on(
            len(latents), cond.guidance_scale, dim, latents.device, cond.prompt_embeds.dtype
        )
        output = unet(latents, timesteps, timestep_cond=embedding, **cond.unet_kwargs())
        return output.sample.float()

    def __call__(
        self, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
    ) -> GaussianStep:
        latents = latents.float()
        timesteps = timesteps.to(latents.device)
        output = self.model_output(unet, latents, timesteps, cond)
        rows = self._tables.on(latents.device)[timesteps.long()]
        abar_t, abar_prev, c_skip, c_out = (rows[:, i].view(-1, 1, 1, 1) for i in range(4))
        x0 = self.predicted_x0(output, latents, abar_t)
        denoised = c_out * x0 + c_skip * latents
        mean = abar_prev.sqrt() * denoised
        std = (1 - abar_prev).sqrt()
        return GaussianStep(mean=mean, std=std, denoised=denoised)

    def guidance_embedding_on(
        self, batch: int, guidance_scale: float, dim: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """The guidance embedding of a batch, made once per (batch, scale, device, dtype)."""
        key = (batch, guidance_scale, dim, device, dtype)
        if key not in self._guidance:
            w = torch.full((batch,), guidance_scale - 1.0)
            self._guidance[key] = guidance_embedding(w, dim).to(device, dtype)
        return self._guidance[key]

    def predicted_x0(self, output: Tensor, latents: Tensor, abar_t: Tensor) -> Tensor:
        a, s = abar_t.sqrt(), (1 - abar_t).sqrt()
        if self.prediction_type == "epsilon":
            return (latents - s * output) / a
        if self.prediction_type == "v_prediction":
            return a * latents - s * output
        if self.prediction_type == "sample":
            return output
        raise UserError(f"unsupported scheduler prediction_type '{self.prediction_type}'")

    def latents_to_decode(self, last_step: GaussianStep, last_latents: Tensor) -> Tensor:
        return last_step.denoised
