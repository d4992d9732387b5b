"""How much arithmetic an epoch needs: the UNet's FLOPs per image, counted once by
PyTorch's ``FlopCounterMode`` on the meta device (no memory, no weights, seconds).

Only useful work counts, as in model FLOPs utilisation (MFU): per image, the sampling
steps' forward passes (classifier-free guidance doubles them) and, per inner epoch, each
trained step's forward and backward, as one micro-batch of one image without gradient
checkpointing (its recomputation is overhead, not useful work). MFU is then
useful FLOPs / seconds / the GPU's dense fp16 rate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowvram_ddpo.config import Config
from lowvram_ddpo.memory.counting import GpuKernelEmulation
from lowvram_ddpo.memory.estimate import MetaRun, meta_run


@dataclass(frozen=True)
class EpochFlops:
    sampling_per_image: float
    """UNet FLOPs of one image's rollout: every step, guidance included."""
    training_per_image: float
    """UNet forward + backward FLOPs of training on one image: every trained step, every
    inner epoch."""
    forward_per_latent: float
    """One UNet forward of one latent (no guidance): the unit the figures are quoted in."""


def _counted(run: MetaRun, work) -> float:  # noqa: ANN001  (a callable)
    """FLOPs of ``work`` on the run's meta models, autocast's casts replayed (the models are
    in half precision) and attention left to PyTorch, where the counter sees it."""
    counter = FlopCounterMode(display=False)
    with GpuKernelEmulation(run.autocast_dtype, fused_attention=False), counter:
        work()
    return float(counter.get_total_flops())


def epoch_flops(config: Config, arch: str) -> EpochFlops:
    """The UNet FLOPs per image of ``config``'s sampling and training, counted on the meta
    models the memory estimate uses (built once per model settings)."""
    run = meta_run(config, arch)
    s, t = config.sample, config.train
    key = ("flops", s.guidance_scale, t.algorithm)
    step, forward, train_step = run.sizes(key, lambda: _count_step_flops(run, config))
    trained_steps = max(1, round(s.num_steps * t.timestep_fraction))
    return EpochFlops(
        sampling_per_image=step * s.num_steps,
        training_per_image=train_step * trained_steps * t.inner_epochs,
        forward_per_latent=forward,
    )


def _count_step_flops(run: MetaRun, config: Config) -> tuple[float, float, float]:
    """(a sampling step, a plain forward, a trained step), each of one image."""
    unet = run.parts.unet
    latents = torch.empty(1, *run.latent_shape(config.sample.resolution), device="meta")
    step_t = run.policy.timesteps()[:1]
    guided = run._conditioning(1, config.sample.guidance_scale)
    plain = run._conditioning(1, 1.0)
    unet.eval()
    with torch.no_grad():
        step = _counted(run, lambda: run.policy(unet, latents, step_t, guided))
        forward = _counted(run, lambda: run.policy(unet, latents, step_t, plain))
    one_image = copy.deepcopy(config)
    one_image.train.batch_size = 1
    one_image.memory.gradient_checkpointing = False
    params = [p for p in unet.parameters() if p.requires_grad]
    try:
        train_step = _counted(run, run.training_work(one_image))
    finally:
        for p in params:
            p.grad = None
        unet.eval()
    return step, forward, train_step
