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


def _counted(work) -> float:  # noqa: ANN001  (a callable)
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return float(counter.get_total_flops())


def epoch_flops(config: Config, arch: str) -> EpochFlops:
    """The UNet FLOPs per image of ``config``'s sampling and training. Counted in fp32
    (the count does not depend on the dtype), without the memory estimate's fused-attention
    stand-in, which would hide attention from the counter."""
    fp32 = _one_image_micro_batch(config)
    fp32.model.mixed_precision = "no"
    run = meta_run(fp32, arch)
    s, t = config.sample, config.train
    key = ("flops", s.guidance_scale, t.algorithm)
    step, forward, train_step = run.sizes(key, lambda: _count_step_flops(run, fp32))
    trained_steps = max(1, round(s.num_steps * t.timestep_fraction))
    return EpochFlops(
        sampling_per_image=step * s.num_steps,
        training_per_image=train_step * trained_steps * t.inner_epochs,
        forward_per_latent=forward,
    )


def _count_step_flops(run: MetaRun, config: Config) -> tuple[float, float, float]:
    """(a guided sampling step, a plain forward, a trained step), for one image."""
    unet, s = run.parts.unet, config.sample
    latents = torch.empty(1, *run.latent_shape(s.resolution), device="meta")
    step_t = run.policy.timesteps()[:1]
    guided = run._conditioning(1, s.guidance_scale)
    plain = run._conditioning(1, 1.0)
    unet.eval()
    with torch.no_grad():
        step = _counted(lambda: run.policy(unet, latents, step_t, guided))
        forward = _counted(lambda: run.policy(unet, latents, step_t, plain))
    params = [p for p in unet.parameters() if p.requires_grad]
    try:
        train_step = _counted(run.training_work(config))
    finally:
        for p in params:
            p.grad = None
        unet.eval()
    return step, forward, train_step


def _one_image_micro_batch(config: Config) -> Config:
    one = copy.deepcopy(config)
    one.train.batch_size = 1
    one.memory.gradient_checkpointing = False
    return one
