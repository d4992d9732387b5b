"""Sampling with log-probs: run a policy step from noise to image, keeping every latent.

A rollout stores, per sample, the latent of every step, the log-prob of each
action and the prompt embedding, all on the CPU. Log-probs are computed on exactly
the fp32 latents that are stored, so replaying a trajectory under unchanged weights
gives an importance ratio of 1.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lowvram_ddpo import flux2
from lowvram_ddpo.device_transfer import to_device
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.meter import PhaseMeter, measured
from lowvram_ddpo.memory.narrowing import NarrowingWidth
from lowvram_ddpo.models import (
    SMALLEST_VAE_TILE,
    VAE_TILE_PIXELS,
    tiling_would_split,
    use_vae_tiling,
    vae_scale,
)
from lowvram_ddpo.offload import Offloader
from lowvram_ddpo.policy import Conditioning, PolicyStep
from lowvram_ddpo.policy.base import draw_noise
from lowvram_ddpo.text_encoding import PromptCache, TextEmbeds, is_sdxl, micro_conditioning


def _loaded(offloader: Offloader | None, name: str) -> AbstractContextManager:
    return nullcontext() if offloader is None else offloader.loaded(name)


@dataclass
class Trajectories:
    """A batch of rollouts, on the CPU."""

    prompts: list[str]
    prompt_embeds: Tensor
    """[B, L, D]"""
    latents: Tensor
    """[B, T + 1, C, h, w] fp32: x_T, ..., x_0."""
    log_probs: Tensor
    """[B, T] fp32: log pi_old(x_{k+1} | x_k)."""
    timesteps: Tensor
    """[T] shared by every sample (long for DDPM schedules, float for flow ones)."""
    images: Tensor | None
    """[B, 3, H, W] float in [0, 1]; the trainer drops them once they are scored."""
    pooled_embeds: Tensor | None = None
    """SDXL: [B, P] pooled prompt embeddings."""
    time_ids: Tensor | None = None
    """SDXL: [6] micro-conditioning, shared by every sample."""
    action_steps: Tensor | None = None
    """[B, W] the steps that sampled (Flow-GRPO-Fast's window), the only ones to train;
    None: every step sampled."""

    def __len__(self) -> int:
        return len(self.latents)

    @staticmethod
    def cat(batches: list[Trajectories]) -> Trajectories:
        return Trajectories(
            prompts=[p for b in batches for p in b.prompts],
            prompt_embeds=torch.cat([b.prompt_embeds for b in batches]),
            latents=torch.cat([b.latents for b in batches]),
            log_probs=torch.cat([b.log_probs for b in batches]),
            timesteps=batches[0].timesteps,
            images=None
            if any(b.images is None for b in batches)
            else torch.cat([b.images for b in batches]),
            pooled_embeds=None
            if any(b.pooled_embeds is None for b in batches)
            else torch.cat([b.pooled_embeds for b in batches]),
            time_ids=batches[0].time_ids,
            action_steps=None
            if any(b.action_steps is None for b in batches)
            else torch.cat([b.action_steps for b in batches]),
        )

    def select(self, index: Tensor) -> Trajectories:
        """The samples at ``index`` (prompts and images left out: training needs neither)."""
        return Trajectories(
            prompts=[],
            prompt_embeds=self.prompt_embeds[index],
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            timesteps=self.timesteps,
            images=None,
            pooled_embeds=None if self.pooled_embeds is None else self.pooled_embeds[index],
            time_ids=self.time_ids,
            action_steps=None if self.action_steps is None else self.action_steps[index],
        )

    def to(self, device: torch.device) -> Trajectories:
        """The tensors on ``device``, each in one asynchronous copy where it can be."""

        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else to_device(tensor, device)

        return Trajectories(
            prompts=self.prompts,
            prompt_embeds=to_device(self.prompt_embeds, device),
            latents=to_device(self.latents, device),
            log_probs=to_device(self.log_probs, device),
            timesteps=to_device(self.timesteps, device),
            images=self.images,
            pooled_embeds=move(self.pooled_embeds),
            time_ids=move(self.time_ids),
            action_steps=move(self.action_steps),
        )

    def text(self, index: Tensor | slice = slice(None)) -> TextEmbeds:
        """The prompt embeddings of the samples at ``index``."""
        pooled = None if self.pooled_embeds is None else self.pooled_embeds[index]
        return TextEmbeds(self.prompt_embeds[index], pooled)


def pixels_per_latent(vae: torch.nn.Module) -> int:
    """How many pixels along a side one latent of the denoiser's decodes to."""
    return vae_scale(vae) * _vae_patch(vae)


def latent_shape(unet: torch.nn.Module, vae: torch.nn.Module, resolution: int) -> tuple[int, ...]:
    """(C, h, w) of the latent image the denoiser works on. FLUX.2's VAE folds 2x2 latent
    patches into the channels (its ``patch_size``), so its h is a sixteenth of the image."""
    scale = pixels_per_latent(vae)
    step = scale * unet.config.get("patch_size", 1)  # SD 3's transformer: 2x2 latent patches
    if resolution % step != 0:
        raise UserError(
            f"the resolution {resolution} (sample.resolution; `sample --resolution`) must be "
            f"a multiple of {step} for this model (its VAE's factor {scale} x its patch size)"
        )
    return (unet.config.in_channels, resolution // scale, resolution // scale)


def _vae_patch(vae: torch.nn.Module) -> int:
    patch = vae.config.get("patch_size") or 1
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def image_tokens(unet: torch.nn.Module, vae: torch.nn.Module, resolution: int) -> int:
    """How many tokens a transformer sees for one image (0 for a UNet: none)."""
    patch = unet.config.get("patch_size")
    if patch is None:
        return 0
    _, h, w = latent_shape(unet, vae, resolution)
    return (h // patch) * (w // patch)


@torch.no_grad()
def rollout(
    unet: torch.nn.Module,
    policy: PolicyStep,
    cond: Conditioning,
    initial_latents: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, range]:
    """Denoise ``initial_latents``; returns (latents [B,T+1,...], log_probs [B,T], timesteps,
    latents to decode [B,...], the steps that sampled). Everything returned is on the CPU
    except the latents to decode. Steps outside ``policy.stochastic_steps`` (Flow-GRPO-Fast's
    window) take the policy's deterministic step, with a log-prob of 0 that is never trained.

    The loop never waits on the host: every step's noise is drawn up front (on the CPU
    generator, in the order the steps use it) and copied in one transfer, the timesteps
    live on the device, and the trajectory goes back to the CPU once, at the end."""
    timesteps = policy.timesteps()
    device = initial_latents.device
    batch = initial_latents.shape[0]
    x = initial_latents.float()
    noise = to_device(draw_noise(tuple(x.shape), len(timesteps), generator), device)
    on_device = timesteps.to(device)
    stochastic = policy.stochastic_steps(generator)
    latents, log_probs = [x], []
    step = None
    for k in tqdm(range(len(timesteps)), desc="denoising", leave=False, disable=not progress):
        t = on_device[k].expand(batch)
        step = policy(unet, x, t, cond)
        if k in stochastic:
            x = step.sample_with(noise[k])
            log_probs.append(step.log_prob(x))
        else:
            x = policy.deterministic_step(step, x, t)
            log_probs.append(torch.zeros(batch, device=device))
        latents.append(x)
    assert step is not None, "a rollout needs at least one step"
    final = policy.latents_to_decode(step, x)
    trajectory = torch.stack(latents, dim=1).cpu()
    return trajectory, torch.stack(log_probs, dim=1).cpu(), timesteps, final, stochastic


def vae_input(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Latents as the VAE's decoder takes them: unscaled and, for SD 3.x's VAE, unshifted
    (FLUX.2's: ``flux2.decoder_input``)."""
    if flux2.is_flux2_vae(vae):
        return flux2.decoder_input(vae, latents)
    shift = vae.config.get("shift_factor") or 0.0
    return latents / vae.config.scaling_factor + shift


@torch.no_grad()
def decode_latents(
    vae: torch.nn.Module,
    latents: Tensor,
    upcast: bool = False,
    batch_size: int | NarrowingWidth = 1,
    own_dtype: bool = False,
) -> Tensor:
    """Images in [0, 1] on the CPU, decoding ``batch_size`` latents at a time (its working
    memory grows with it: ``memory.decode_batch``). Given a ``NarrowingWidth`` (the
    trainer's), a call that runs out of GPU memory is decoded again with half as many,
    at one image in tiles (``tile_from_now_on``); the width keeps the change and its
    notes. Given a number, an error stands (a benchmark's widths mean what they say).

    ``upcast`` (SDXL's VAE, which overflows in fp16): an fp16 VAE decodes in fp32, outside
    autocast, and goes back to fp16 afterwards, as diffusers' SDXL pipeline does.
    ``own_dtype`` (``speed.half_decode``): the VAE decodes in its own dtype outside autocast,
    as diffusers' SD 1.5 pipeline does, not with autocast's float32 norms; should that
    overflow (NaN pixels: some fine-tuned VAEs do in fp16), the latents are decoded again
    as without it, with a warning."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    # nn.Module.to: diffusers' own .to() warns about exactly this cast, which is intended
    if upcast:
        torch.nn.Module.to(vae, torch.float32)

    def decode(chunk: Tensor) -> Tensor:
        z = chunk.to(device, next(vae.parameters()).dtype)
        image = vae.decode(vae_input(vae, z)).sample.float()
        return (image / 2 + 0.5).clamp(0, 1)

    try:
        outside_autocast = upcast or own_dtype
        with torch.autocast(device.type, enabled=False) if outside_autocast else nullcontext():
            if isinstance(batch_size, int):  # as given: an error stands
                images = [decode(chunk) for chunk in latents.split(batch_size)]
            else:
                images = batch_size.map(latents, decode, lambda: tile_from_now_on(vae, latents))
    finally:
        if upcast:
            torch.nn.Module.to(vae, dtype)
    result = torch.cat(images).cpu()  # one copy back (each a wait on the GPU)
    if own_dtype and not upcast and torch.isnan(result).any():  # on the host: no extra wait
        warnings.warn(HALF_DECODE_OVERFLOW, stacklevel=2)
        return decode_latents(vae, latents, upcast, batch_size)
    return result


HALF_DECODE_OVERFLOW = (
    "speed.half_decode: the VAE's decode in its own half precision gave NaN pixels (an "
    "overflow); these images were decoded again under autocast. If it repeats, set "
    "speed.half_decode=false"
)


def decode_width(images: int) -> NarrowingWidth:
    """A decode width of ``images`` that halves on out-of-memory (``memory.decode_batch``)."""
    return NarrowingWidth(images, "memory.decode_batch")


def tile_from_now_on(vae: torch.nn.Module, latents: Tensor) -> str:
    """The decode's last resort after one image ran out of memory: diffusers' tiling (the
    line that says so), in 512 px tiles where the image is larger, else in tiles of half
    the image (SD 1.5's 512 px in 256 px tiles: nine overlapping tiles, seams blended, a
    quarter of the working memory); "" where tiling is on already or has no switch."""
    if getattr(vae, "use_tiling", True):  # a VAE without the switch cannot tile
        return ""
    pixels = latents.shape[-1] * pixels_per_latent(vae)
    if tiling_would_split(vae, pixels):
        use_vae_tiling(vae, True)
        return (
            f"out of GPU memory decoding one image: decoding in {VAE_TILE_PIXELS} px tiles "
            "from now on (memory.vae_tiling = true starts there)"
        )
    tile = pixels // 2
    if tile < SMALLEST_VAE_TILE:
        return ""
    use_vae_tiling(vae, True, tile)
    return (
        f"out of GPU memory decoding one {pixels} px image: decoding in {tile} px tiles "
        "from now on (seams blended; on a card this small, a lower resolution fits better)"
    )


def decodes_in_fp32(vae: torch.nn.Module, sdxl: bool) -> bool:
    """SDXL pipelines decode an fp16 VAE marked ``force_upcast`` in fp32 (its fp16
    activations overflow), as diffusers does; SD 1.x decodes in its own dtype."""
    fp16 = next(vae.parameters()).dtype == torch.float16
    return sdxl and fp16 and bool(vae.config.get("force_upcast", False))


def initial_noise(
    shape: tuple[int, ...], batch: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """x_T drawn on the CPU generator (same images on any device for the same seed)."""
    return torch.randn((batch, *shape), generator=generator).to(device)


def sample_trajectories(
    pipe,  # noqa: ANN001  (a StableDiffusion(XL)Pipeline)
    unet: torch.nn.Module,
    policy: PolicyStep,
    prompts: list[str],
    negative: TextEmbeds | None,
    guidance_scale: float,
    resolution: int,
    generator: torch.Generator,
    progress: bool = False,
    offloader: Offloader | None = None,
    cache: PromptCache | None = None,
    decode_batch: int | NarrowingWidth = 1,
    meter: PhaseMeter | None = None,
    half_decode: bool = False,
) -> Trajectories:
    """One sampling batch: encode prompts, roll out, decode (``decode_batch`` images per
    VAE call). Returns CPU tensors.

    With an ``offloader`` the text encoder and VAE are on the GPU only while they work;
    with a ``cache`` the text encoder runs (and moves) only for prompts it has not seen;
    with a ``meter`` (the trainer's) the denoising and the decode are its phases
    "sampling" and "decode", each with its own peak. ``half_decode``: the VAE decodes in
    its own dtype, outside autocast (``speed.half_decode``)."""
    device = next(unet.parameters()).device
    cache = PromptCache() if cache is None else cache
    with measured(meter, "sampling"):
        if cache.missing(prompts):
            with _loaded(offloader, "text_encoder"):
                text = cache.encode(pipe, prompts).to(device)
        else:
            text = cache.cached(prompts).to(device)
        time_ids = micro_conditioning(unet.config, resolution)
        cond = Conditioning.of(text, negative, guidance_scale, time_ids)
        shape = latent_shape(unet, pipe.vae, resolution)
        noise = initial_noise(shape, len(prompts), generator, device)
        latents, log_probs, timesteps, final, stochastic = rollout(
            unet, policy, cond, noise, generator, progress
        )
    windowed = len(stochastic) < len(timesteps)
    with measured(meter, "decode"), _loaded(offloader, "vae"):
        upcast = decodes_in_fp32(pipe.vae, is_sdxl(pipe))
        images = decode_latents(pipe.vae, final, upcast, decode_batch, own_dtype=half_decode)
    return Trajectories(
        prompts=list(prompts),
        prompt_embeds=text.hidden.cpu(),
        latents=latents,
        log_probs=log_probs,
        timesteps=timesteps,
        images=images,
        pooled_embeds=None if text.pooled is None else text.pooled.cpu(),
        time_ids=time_ids,
        action_steps=torch.tensor(stochastic).expand(len(prompts), -1) if windowed else None,
    )


def render(
    pipe,  # noqa: ANN001  (a StableDiffusion(XL)Pipeline)
    unet: torch.nn.Module,
    policy: PolicyStep,
    prompts: list[str],
    seeds: list[int],
    negative: TextEmbeds | None,
    guidance_scale: float,
    resolution: int,
    progress: bool = False,
    offloader: Offloader | None = None,
    cache: PromptCache | None = None,
    decode: int | NarrowingWidth = 1,
    half_decode: bool = False,
) -> Tensor:
    """[P, S, 3, H, W] images, one per (prompt, seed), each from its own seeded generator,
    so an image depends only on its prompt, its seed and the weights. ``decode``: as
    ``decode_latents``'s width (a ``NarrowingWidth`` falls back to tiles); ``half_decode``:
    as ``sample_trajectories``'."""
    rows = []
    for prompt in tqdm(prompts, desc="rendering", leave=False, disable=not progress):
        row = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            row.append(
                sample_trajectories(
                    pipe,
                    unet,
                    policy,
                    [prompt],
                    negative,
                    guidance_scale,
                    resolution,
                    generator,
                    offloader=offloader,
                    cache=cache,
                    decode_batch=decode,
                    half_decode=half_decode,
                ).images[0]
            )
        rows.append(torch.stack(row))
    return torch.stack(rows)
