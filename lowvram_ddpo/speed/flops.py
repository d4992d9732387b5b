"""How much arithmetic an epoch needs: the UNet's FLOPs per image, counted once by
PyTorch's ``FlopCounterMode`` on the meta device (no memory, no weights, seconds).

Only useful work counts, as in model FLOPs utilisation (MFU): per image, the sampling
steps' forward passes (classifier-free guidance doubles them) and, per inner epoch, each
trained step's forward and backward (with the forwards without gradients the algorithm
makes there: the KL guard's base model, NFT's old policy), as one micro-batch of one
image without gradient checkpointing (its recomputation is overhead, not useful work). MFU is then
useful FLOPs / seconds / the GPU's dense fp16 rate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from lowvram_ddpo.algorithms.steps import no_grad_calls_per_micro_step
from lowvram_ddpo.config import (
    POLICY_GRADIENT,
    Config,
    MemoryConfig,
    SampleConfig,
    trained_steps_per_sample,
)
from lowvram_ddpo.memory.checkpointing import (
    disable_checkpointing,
    enable_checkpointing,
    resolution_levels,
)
from lowvram_ddpo.memory.counting import GpuKernelEmulation, ShapeOnlyKernels, attention_inputs
from lowvram_ddpo.memory.estimate import MetaRun, meta_run
from lowvram_ddpo.memory.fp8_weights import fp8_layers
from lowvram_ddpo.models import use_vae_tiling
from lowvram_ddpo.rollout import vae_input


@dataclass(frozen=True)
class Recomputation:
    """What gradient checkpointing runs again in the backward with
    ``memory.uncheckpointed_levels`` = 0, 1, ... (lowest-resolution levels kept out first),
    over what it runs again with every level checkpointed: its arithmetic, its layer
    calls (the kernels the host launches again) and their weights (an fp8 base's are
    dequantised again). The time model calibrated full checkpointing on a GPU; keeping
    levels out scales each of its costs by its share. A model without levels has only
    the first, 1.0."""

    arithmetic: tuple[float, ...] = (1.0,)
    launches: tuple[float, ...] = (1.0,)
    weights: tuple[float, ...] = (1.0,)
    self_attention: tuple[float, ...] = (0.0,)
    """The part of ``arithmetic`` that is self-attention's kernels (QK^T and the weighted
    sum): what ``memory.keep_attention`` keeps instead of computing again."""

    def left(
        self, uncheckpointed_levels: int, keep_attention: bool = False
    ) -> tuple[float, float, float]:
        """(arithmetic, launches, weights) recomputed with these levels kept out (and
        self-attention's outputs kept). More levels than the model has are refused where
        it is built (``kept_blocks``): here they count as the most it can keep out. A kept
        attention's kernel is one launch of a layer's dozens: launches stay as they are."""
        k = min(uncheckpointed_levels, len(self.arithmetic) - 1)
        kept = self.self_attention[min(k, len(self.self_attention) - 1)] if keep_attention else 0
        return self.arithmetic[k] - kept, self.launches[k], self.weights[k]


@dataclass(frozen=True)
class EpochFlops:
    sampling_per_image: float
    """UNet FLOPs of one image's rollout: every step, guidance included."""
    training_per_image: float
    """UNet forward + backward FLOPs of training on one image: every trained step, every
    inner epoch."""
    forward_per_latent: float
    """One UNet forward of one latent (no guidance): the unit the figures are quoted in."""
    trained_steps: int = 1
    """Steps of each image trained per inner epoch (``config.trained_steps_per_sample``)."""
    decode_per_image: float = 0.0
    """The VAE's decode of one image in one pass (not the UNet's: out of MFU)."""
    tiled_decode_per_image: float = 0.0
    """The same in overlapping tiles (``memory.vae_tiling``; SDXL at 1024 px: 9 tiles of
    at most 512 px, counted 1.5x one pass); one pass where a tile covers the image."""

    recomputation: Recomputation = Recomputation()
    """What checkpointing runs again, by the levels kept out of it."""

    fp8_layers: int = 0
    """The UNet's layers ``memory.quantize=fp8`` stores in 8 bits (``fp8_weights``)..."""
    fp8_weights: int = 0
    """...and their weights: what each call then dequantises (the time model's cost)."""

    trained_latents: float = 1.0
    """A trained step's latents per image over a sampling step's: 0.5 where the sampling
    is guided and the training is not (RWR and NFT train without classifier-free
    guidance), else 1. What checkpointing recomputes scales with it."""
    calls_without_gradients: int = 0
    """The algorithm's forwards without gradients per trained step (the KL guard's base
    model, NFT's old policy) that ``training_per_image`` holds: counted, those of the
    settings counted; derived from the sampling step (``count_backward=False``) none, and
    the time model adds what the run makes."""

    def decode(self, tiled: bool) -> float:
        return self.tiled_decode_per_image if tiled else self.decode_per_image

    def recomputed_per_step(self, memory: MemoryConfig, sampling_steps: int) -> float:
        """What gradient checkpointing computes again in one image's trained step: the
        share of a guided forward its checkpointed levels hold (0 without it). Work the
        GPU does that MFU does not count."""
        if not memory.gradient_checkpointing:
            return 0.0
        share = self.recomputation.left(memory.uncheckpointed_levels, memory.keep_attention)[0]
        return share * self.trained_latents * self.sampling_per_image / sampling_steps


def _counted(run: MetaRun, work, counter: FlopCounterMode | None = None) -> float:  # noqa: ANN001
    """FLOPs of ``work`` (a callable) on the run's meta models, autocast's casts replayed (the
    models are in half precision) and attention left to PyTorch, where the counter sees it;
    the ops themselves run as the memory estimate runs them (the counter sees the same
    shapes)."""
    counter = counter or FlopCounterMode(display=False)
    with (
        GpuKernelEmulation(run.autocast_dtype, fused_attention=False),
        ShapeOnlyKernels(),
        counter,  # entered last, so above the shortcuts: it sees each op first
    ):
        work()
    return float(counter.get_total_flops())


TRAINED_OVER_SAMPLING_STEP = 2.13
"""A trained step's forward and backward over the sampling step it replays, as counted on
SD 1.5 at 512 px (4.26 forwards against 2 with guidance; the same 2.13 on the LCM shape
without guidance). `--vram` uses it instead of counting the backward, which takes seconds
on SDXL; `bench speed` counts."""


def trained_latents_per_sampled(config: Config) -> float:
    """A trained step's latents per image over a sampling step's (``EpochFlops``): policy
    gradients replay the guided step (both halves), RWR and NFT train one latent."""
    guided = config.sample.guidance_scale != 1.0
    return 0.5 if guided and config.train.algorithm not in POLICY_GRADIENT else 1.0


def epoch_flops(config: Config, arch: str, count_backward: bool = True) -> EpochFlops:
    """The UNet FLOPs per image of ``config``'s sampling and training, counted on the meta
    models the memory estimate uses (built once per model settings, each count kept).
    ``count_backward=False`` derives training from sampling (``TRAINED_OVER_SAMPLING_STEP``)
    and leaves ``forward_per_latent`` uncounted (0)."""
    run = meta_run(config, arch)
    s, t = config.sample, config.train
    step, recomputation = run.sizes(
        ("flops: sampling step", s.guidance_scale),
        lambda: _sampling_step(run, config, s.guidance_scale),
    )
    trained_latents = trained_latents_per_sampled(config)
    if count_backward:
        trained = run.sizes(
            ("flops: trained step", s.guidance_scale, t.algorithm, t.kl_coef > 0),
            lambda: _trained_step(run, config),
        )
        forward, _ = run.sizes(("flops: forward",), lambda: _sampling_step(run, config, 1.0))
    else:
        trained = step * trained_latents * TRAINED_OVER_SAMPLING_STEP
        forward = 0.0
    trained_steps = trained_steps_per_sample(s, t, run.policy.trainable_steps())
    decode = {
        tiled: run.sizes(("flops: decode", s.resolution, tiled), partial(_decode, run, s, tiled))
        for tiled in (False, True)
    }
    layers, weights = run.sizes(("fp8 layers",), partial(_fp8_layers, run))
    return EpochFlops(
        sampling_per_image=step * s.num_steps,
        training_per_image=trained * trained_steps * t.inner_epochs,
        forward_per_latent=forward,
        trained_steps=trained_steps,
        decode_per_image=decode[False],
        tiled_decode_per_image=decode[True],
        recomputation=recomputation,
        fp8_layers=layers,
        fp8_weights=weights,
        trained_latents=trained_latents,
        calls_without_gradients=(
            no_grad_calls_per_micro_step(t.algorithm, t.kl_coef) if count_backward else 0
        ),
    )


def _fp8_layers(run: MetaRun) -> tuple[int, int]:
    layers = [layer for _, layer in fp8_layers(run.parts.unet)]
    return len(layers), sum(layer.weight.numel() for layer in layers)


def _sampling_step(
    run: MetaRun, config: Config, guidance_scale: float
) -> tuple[float, Recomputation]:
    """One denoising step of one image (guidance 1.0: a plain forward), and what gradient
    checkpointing would run again of it: counted in training mode with gradients on,
    where the checkpoints run (the step's arithmetic is the same in either mode: no
    dropout, no batch statistics)."""
    unet = run.parts.unet
    latents = torch.empty(1, *run.latent_shape(config.sample.resolution), device="meta")
    cond = run._conditioning(1, guidance_scale)
    counter = FlopCounterMode(display=False)
    unet.train()
    try:
        with torch.enable_grad(), _checkpoints_counted(unet, counter) as by_level:
            step = _counted(
                run, lambda: run.policy(unet, latents, run.policy.timesteps()[:1], cond), counter
            )
    finally:
        unet.eval()
    arithmetic = sum(by_level["arithmetic"])
    shares = {kind: _shares(by_level[kind]) for kind in RECOMPUTED[:-1]}
    return step, Recomputation(
        **shares, self_attention=_parts(by_level["self_attention"], arithmetic)
    )


RECOMPUTED = ("arithmetic", "launches", "weights", "self_attention")


def _parts(by_level: list[float], whole: float) -> tuple[float, ...]:
    """What is left with 0, 1, ... of the lowest levels kept out, of ``whole`` (another
    kind's total: self-attention's part of the recomputed arithmetic)."""
    if not by_level or whole == 0:
        return (0.0,) * max(len(by_level), 1)
    return tuple(sum(by_level[k:]) / whole for k in range(len(by_level)))


def _shares(by_level: list[float]) -> tuple[float, ...]:
    """What is left with 0, 1, ... of the lowest levels kept out, of the whole."""
    total = sum(by_level)
    if not by_level or total == 0:  # no levels, or none checkpointed
        return (1.0,) * max(len(by_level), 1)
    return _parts(by_level, total)


@contextmanager
def _checkpoints_counted(
    unet: torch.nn.Module, counter: FlopCounterMode
) -> Iterator[dict[str, list[float]]]:
    """Checkpointing on, with a checkpoint function that only counts what it runs (what a
    backward would run again) by the UNet's resolution level, lowest first: its FLOPs,
    its layer calls and their weights, and its self-attention's FLOPs (``RECOMPUTED``),
    filled in as the forward runs. Checkpointing is off again afterwards."""
    levels = resolution_levels(unet)
    by_level = {kind: [0.0] * len(levels) for kind in RECOMPUTED}
    current = [0]  # the level whose block runs now
    inside = [False]  # a checkpoint inside another is counted once, by the outer one

    def counting_checkpoint(function, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if inside[0]:
            return function(*args, **kwargs)
        before, inside[0] = counter.get_total_flops(), True
        try:
            return function(*args, **kwargs)
        finally:
            inside[0] = False
            by_level["arithmetic"][current[0]] += counter.get_total_flops() - before

    def _add_if_inside(flops: float) -> None:
        if inside[0]:
            by_level["self_attention"][current[0]] += flops

    def layer_call(module: torch.nn.Module, _args: object) -> None:
        if inside[0] and next(module.children(), None) is None:  # a layer: its kernels
            by_level["launches"][current[0]] += 1
            by_level["weights"][current[0]] += sum(p.numel() for p in module.parameters())

    if not levels:  # nothing is checkpointed by level: the lists stay empty
        yield by_level
        return
    hooks = [
        block.register_forward_pre_hook(lambda *_, level=level: current.__setitem__(0, level))
        for level, blocks in enumerate(levels)
        for block in blocks
    ]
    hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(layer_call))
    enable_checkpointing(unet, counting_checkpoint)
    try:
        with _SelfAttentionCounted(lambda flops: _add_if_inside(flops)):
            yield by_level
    finally:
        for hook in hooks:
            hook.remove()
        disable_checkpointing(unet)


class _SelfAttentionCounted(TorchFunctionMode):
    """Hands ``add`` the FLOPs of each self-attention call (query and key of one length):
    2 x B x heads x L x L x query width for QK^T, the same with the value's width for the
    weighted sum."""

    def __init__(self, add: Callable[[float], None]) -> None:
        super().__init__()
        self.add = add

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = attention_inputs(args, kwargs)
            if q.shape[-2] == k.shape[-2]:
                rows = q.numel() // q.shape[-1]  # B x heads x L
                self.add(2.0 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
        return func(*args, **kwargs)


def _decode(run: MetaRun, sample: SampleConfig, tiled: bool) -> float:
    """One image's decode (the memory estimate sets the tiling again before its own)."""
    vae = run.parts.vae
    latent = torch.empty(1, *run.latent_shape(sample.resolution), device="meta", dtype=run.dtype)
    use_vae_tiling(vae, tiled)
    with torch.no_grad():
        return _counted(run, lambda: vae.decode(vae_input(vae, latent)).sample)


def _trained_step(run: MetaRun, config: Config) -> float:
    """One trained step of one image: forward and backward, no checkpointing."""
    one_image = copy.deepcopy(config)
    one_image.train.batch_size = 1
    one_image.memory.gradient_checkpointing = False
    params = [p for p in run.parts.unet.parameters() if p.requires_grad]
    try:
        return _counted(run, run.training_work(one_image))
    finally:
        for p in params:
            p.grad = None
        run.parts.unet.eval()
