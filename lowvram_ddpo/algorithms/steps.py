"""One training micro-step of each family of algorithms: the loss for a micro-batch at
one (sampled) timestep, with the UNet's forward pass inside.

- policy gradient (DDPO-IS, DDPO-SF): re-score the stored action ``x_{k+1}`` under
  the current weights and compare with the log-prob recorded while sampling;
- reward weighted (RWR, sparse RWR): the denoising loss on the model's own final
  samples at a random timestep, weighted per sample;
- DiffusionNFT (flow models): the model's own final samples re-noised at one of the
  sampler's noise levels, its velocity against the sampling policy's (``nft.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from lowvram_ddpo.algorithms.losses import (
    ppo_clip_loss,
    score_function_loss,
    weighted_denoising_loss,
)
from lowvram_ddpo.algorithms.nft import SamplingWeights, nft_objective
from lowvram_ddpo.config import CLIPPED_RATIO
from lowvram_ddpo.device_transfer import to_device
from lowvram_ddpo.policy import Conditioning, FlowSDEPolicy, GaussianStep, PolicyStep
from lowvram_ddpo.policy.flow_sde import flow_model_output
from lowvram_ddpo.rollout import Trajectories
from lowvram_ddpo.text_encoding import TextEmbeds


@dataclass
class MicroBatch:
    """Which samples, and for each of them which step of its trajectory, to train on."""

    samples: Tensor
    """[b] indices into the trajectories."""
    steps: Tensor
    """[b] step index k (the action is x_k -> x_{k+1})."""


def no_grad_calls_per_micro_step(algorithm: str, kl_coef: float) -> int:
    """UNet calls without gradients that a training micro-step makes besides its trained
    one: NFT's old-policy velocity, and the base model's step with the KL guard. Each is a
    forward of the micro-batch, guided as the trained call is (NFT: never); under CUDA
    graphs each is a graph, with its own share of the pool."""
    return int(algorithm == "nft") + int(kl_coef > 0)


def _conditioning(
    trajectories: Trajectories,
    batch: MicroBatch,
    negative: TextEmbeds | None,
    scale: float,
    device: torch.device,
) -> Conditioning:
    """The conditioning the samples were drawn with (same prompts, negative, sizes)."""
    text = trajectories.text(batch.samples).to(device)
    return Conditioning.of(text, negative, scale, trajectories.time_ids)


def policy_gradient_loss(
    algorithm: str,
    unet: torch.nn.Module,
    policy: PolicyStep,
    trajectories: Trajectories,
    batch: MicroBatch,
    advantages: Tensor,
    negative: TextEmbeds | None,
    guidance_scale: float,
    clip_range: float,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DDPO's loss; with ``kl_coef`` > 0 plus ``kl_coef`` x the KL of this step to the base
    model's (logged as ``kl_to_base``)."""
    device = next(p for p in unet.parameters() if p.requires_grad).device
    x_t = trajectories.latents[batch.samples, batch.steps].to(device)
    x_next = trajectories.latents[batch.samples, batch.steps + 1].to(device)
    old_log_prob = trajectories.log_probs[batch.samples, batch.steps].to(device)
    timesteps = trajectories.timesteps[batch.steps]
    cond = _conditioning(trajectories, batch, negative, guidance_scale, device)
    # the base model's step first: its activations are freed before the trained forward
    # saves its own, so the penalty adds no memory to the training peak
    reference = base_model_step(unet, policy, x_t, timesteps, cond) if kl_coef > 0 else None
    step = policy(unet, x_t, timesteps, cond)
    log_prob = step.log_prob(x_next)
    adv = advantages[batch.samples].to(device)
    if algorithm in CLIPPED_RATIO:
        loss, metrics = ppo_clip_loss(log_prob, old_log_prob, adv, clip_range)
    else:
        loss, metrics = score_function_loss(log_prob, old_log_prob, adv)
    if reference is not None:
        kl = step.kl_to(reference)
        loss = loss + kl_coef * kl.mean()
        metrics["kl_to_base"] = kl.detach().mean()
    return loss, metrics


@contextmanager
def base_model(unet: torch.nn.Module) -> Iterator[None]:
    """The base model inside the block: the same network with its LoRA adapters switched
    off (no second copy in memory), without gradients."""
    model = getattr(unet, "module", unet)  # under DistributedDataParallel
    with torch.no_grad():
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()


def base_model_step(
    unet: torch.nn.Module, policy: PolicyStep, x_t: Tensor, timesteps: Tensor, cond: Conditioning
) -> GaussianStep:
    """The step the base model takes (``base_model``)."""
    with base_model(unet):
        return policy(unet, x_t, timesteps, cond)


def denoising_target(scheduler: DDIMScheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0


def reward_weighted_loss(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    trajectories: Trajectories,
    batch: MicroBatch,
    weights: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, Tensor]]:
    device = next(p for p in unet.parameters() if p.requires_grad).device
    x0 = trajectories.latents[batch.samples, -1].to(device)
    # drawn on the CPU generator: the same timesteps and noise on any device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t, noise = to_device(t, device), to_device(noise, device)
    noisy = scheduler.add_noise(x0, noise, t)
    target = denoising_target(scheduler, x0, noise, t)
    cond = _conditioning(trajectories, batch, None, 1.0, device)
    prediction = unet(noisy, t, **cond.unet_kwargs()).sample
    return weighted_denoising_loss(prediction, target, weights[batch.samples].to(device))


def nft_loss(
    unet: torch.nn.Module,
    policy: FlowSDEPolicy,
    trajectories: Trajectories,
    batch: MicroBatch,
    r: Tensor,
    generator: torch.Generator,
    sampling_weights: SamplingWeights,
    beta: float,
    adv_clip_max: float,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's loss for a micro-batch, each sample re-noised at the noise level of
    its step ``batch.steps`` with fresh noise (no guidance: NFT trains CFG-free); with
    ``kl_coef`` plus ``kl_coef`` x the squared velocity gap to the base model (its
    ``train.beta``), logged as ``kl_to_base``."""
    device = next(p for p in unet.parameters() if p.requires_grad).device
    x0 = trajectories.latents[batch.samples, -1].to(device)
    timesteps = trajectories.timesteps[batch.steps].to(device)
    sigma = policy.step_coefficients(timesteps)[0]
    noise = to_device(torch.randn(x0.shape, generator=generator), device)  # CPU draw: any device
    noisy = (1 - sigma) * x0 + sigma * noise
    cond = _conditioning(trajectories, batch, None, 1.0, device)
    with torch.no_grad(), sampling_weights.in_use():
        old_velocity = flow_model_output(unet, noisy, timesteps, cond)
    reference = None
    if kl_coef > 0:
        with base_model(unet):
            reference = flow_model_output(unet, noisy, timesteps, cond)
    velocity = flow_model_output(unet, noisy, timesteps, cond)
    signal = r[batch.samples].to(device)
    loss, metrics = nft_objective(
        velocity, old_velocity, noisy, x0, sigma, signal, beta, adv_clip_max
    )
    if reference is not None:
        gap = ((velocity - reference) ** 2).mean(dim=tuple(range(1, velocity.ndim)))
        loss = loss + kl_coef * gap.mean()
        metrics["kl_to_base"] = gap.detach().mean()
    return loss, metrics
