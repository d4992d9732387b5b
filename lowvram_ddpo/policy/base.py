"""The interface every sampler step implements: a Gaussian policy over the next latent.

The trainer only ever asks a policy step for the distribution of ``x_prev`` given
``x_t``; it never needs to know whether that step is DDIM, a consistency model or
anything else. A step returns the mean and std of ``x_prev`` and, through
``GaussianStep``, the exact log-prob of any stored ``x_prev``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from lowvram_ddpo.text_encoding import TextEmbeds

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of an isotropic Gaussian, averaged (not summed) over all but the batch dim.

    The average keeps log-prob differences small enough for a PPO clip range of 1e-4,
    as in the reference implementation.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    per_dim = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return per_dim.mean(dim=tuple(range(1, x.ndim)))


def draw_noise(shape: tuple[int, ...], count: int, generator: torch.Generator | None) -> Tensor:
    """[count, *shape] standard-normal fp32 draws, one ``shape`` at a time in order: the
    same numbers ``count`` successive ``GaussianStep.sample`` calls would draw (on the
    generator's device; the global CPU generator when None)."""
    device = "cpu" if generator is None else generator.device
    draws = [
        torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        for _ in range(count)
    ]
    return torch.stack(draws)


class DeviceTable:
    """A small lookup table (per-timestep coefficients), copied to each device once, so
    that a denoising step indexes it where it runs instead of waiting on the host."""

    def __init__(self, table: Tensor) -> None:
        self._copies = {table.device: table}
        self._source = table

    def on(self, device: torch.device) -> Tensor:
        if device not in self._copies:
            self._copies[device] = self._source.to(device)
        return self._copies[device]


@dataclass
class GaussianStep:
    """The policy's distribution over ``x_prev``: N(mean, std^2 I)."""

    mean: Tensor
    """[B, C, H, W], fp32."""
    std: Tensor
    """Broadcastable to ``mean`` ([B, 1, 1, 1]), fp32, > 0."""
    denoised: Tensor
    """The step's estimate of the clean latent x_0 (what a consistency model decodes)."""

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = draw_noise(tuple(self.mean.shape), 1, generator)[0]
        return self.sample_with(noise.to(self.mean.device))

    def sample_with(self, noise: Tensor) -> Tensor:
        """The action for a standard-normal ``noise`` drawn beforehand (on the device)."""
        return self.mean + self.std * noise

    def log_prob(self, x_prev: Tensor) -> Tensor:
        """[B] log-prob of ``x_prev`` (mean over latent dims)."""
        return gaussian_log_prob(x_prev, self.mean, self.std.expand_as(self.mean))

    def kl_to(self, other: GaussianStep) -> Tensor:
        """[B] KL(self || other), averaged over latent dims as the log-prob is. For the
        equal stds of one timestep it is ``||mean - other.mean||^2 / (2 std^2)``."""
        mean, other_mean = self.mean.float(), other.mean.float()
        var = self.std.float().expand_as(mean) ** 2
        other_var = other.std.float().expand_as(mean) ** 2
        per_dim = 0.5 * (
            torch.log(other_var / var) + (var + (mean - other_mean) ** 2) / other_var - 1
        )
        return per_dim.mean(dim=tuple(range(1, mean.ndim)))


@dataclass
class Conditioning:
    """Text conditioning for one batch, already encoded and on the UNet's device."""

    prompt_embeds: Tensor
    """[B, L, D]"""
    negative_embeds: Tensor | None = None
    """[B, L, D] for classifier-free guidance; None for no guidance."""
    guidance_scale: float = 1.0
    pooled_embeds: Tensor | None = None
    """SDXL: [B, P] pooled text embedding (``added_cond_kwargs["text_embeds"]``); SD3:
    ``pooled_projections``."""
    negative_pooled: Tensor | None = None
    time_ids: Tensor | None = None
    """SDXL: [6] micro-conditioning (sizes and crop), shared by the batch."""

    @classmethod
    def of(
        cls,
        prompt: TextEmbeds,
        negative: TextEmbeds | None,
        guidance_scale: float,
        time_ids: Tensor | None = None,
    ) -> Conditioning:
        """From encoded prompts and one negative embedding (broadcast to the batch)."""
        neg = None if negative is None else negative.to(prompt.hidden.device).expand(len(prompt))
        return cls(
            prompt_embeds=prompt.hidden,
            negative_embeds=None if neg is None else neg.hidden,
            guidance_scale=guidance_scale,
            pooled_embeds=prompt.pooled,
            negative_pooled=None if neg is None else neg.pooled,
            time_ids=time_ids,
        )

    @property
    def guided(self) -> bool:
        """Whether a step runs classifier-free guidance (the UNet batch doubled)."""
        return self.negative_embeds is not None and self.guidance_scale != 1.0

    def embeddings(self, doubled: bool = False) -> tuple[Tensor, Tensor | None]:
        """(token embeddings, pooled embedding or None); ``doubled``: negative rows first,
        then the prompts, for one classifier-free-guided pass."""
        hidden, pooled = self.prompt_embeds, self.pooled_embeds
        if doubled:
            assert self.negative_embeds is not None, "guidance needs a negative embedding"
            hidden = torch.cat([self.negative_embeds, hidden])
            if pooled is not None:
                assert self.negative_pooled is not None, "guidance needs a pooled negative"
                pooled = torch.cat([self.negative_pooled, pooled])
        return hidden, pooled

    def unet_kwargs(self, doubled: bool = False) -> dict[str, object]:
        """The UNet's conditioning arguments (``doubled`` as in ``embeddings``)."""
        hidden, pooled = self.embeddings(doubled)
        kwargs: dict[str, object] = {"encoder_hidden_states": hidden}
        if pooled is not None:
            assert self.time_ids is not None, "SDXL conditioning needs its time_ids"
            time_ids = self.time_ids.to(pooled.device, pooled.dtype).expand(len(pooled), -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs


class PolicyStep(ABC):
    """A sampler step seen as a Gaussian policy ``pi(x_prev | x_t, t, c)``."""

    @abstractmethod
    def timesteps(self) -> Tensor:
        """The [T] timesteps of a rollout, first (noisiest) to last."""

    @abstractmethod
    def __call__(
        self, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
    ) -> GaussianStep:
        """The distribution of the next latent for a batch at per-sample ``timesteps`` [B]."""

    def latents_to_decode(self, last_step: GaussianStep, last_latents: Tensor) -> Tensor:
        """What the VAE decodes after the final step: the sampled latent by default."""
        return last_latents

    def for_viewing(self) -> PolicyStep:
        """The sampler for images people look at (grids, evaluation, ``sample``): this
        policy, unless it has a deterministic counterpart a user's own pipeline runs."""
        return self

    def trainable_steps(self) -> int:
        """How many of a rollout's first steps a policy gradient may train (every one)."""
        return len(self.timesteps())

    def stochastic_steps(self, generator: torch.Generator | None) -> range:
        """The steps of a rollout that sample (the actions trained on); the others take
        ``deterministic_step``. Every step by default."""
        return range(len(self.timesteps()))

    def deterministic_step(self, step: GaussianStep, latents: Tensor, timesteps: Tensor) -> Tensor:
        """The noise-free next latent, for steps outside ``stochastic_steps``."""
        raise NotImplementedError(f"{type(self).__name__} samples every step")
