"""FLUX.2-klein (Black Forest Labs, 2026): what differs from SD 3.x, in one place.

diffusers' ``Flux2KleinPipeline`` pairs a rectified-flow transformer
(``Flux2Transformer2DModel``) with a Qwen3 text encoder and a VAE whose latents are cut
into 2x2 patches. The trainer, policy and rollout keep seeing what they see for SD 3: a
latent image ``[B, C, h, w]`` (here C = 4 x the VAE's channels, h = H / 16) and a
velocity of the same shape. This module does the rest, as the pipeline does
(``pipeline_flux2_klein.py``; docs/research/flow_matching.md section 4):

- the transformer call: the latent image packed into a token sequence ``[B, h w, C]``
  with 4-D position ids (t, h, w, l), the timestep divided by 1000, no guidance
  embedding, and the output unpacked back;
- the prompt: Qwen3's hidden states of layers 9, 18 and 27 side by side, 512 tokens,
  through the pipeline's own ``encode_prompt``; no pooled embedding;
- the schedule: sigmas ``linspace(1, 1/N, N)`` shifted by ``mu``, which depends on the
  image's token count (``compute_empirical_mu``);
- decoding: the VAE's BatchNorm statistics undone, the 2x2 patches put back in place.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lowvram_ddpo.errors import UserError

PIPELINE_CLASS_NAME = "Flux2KleinPipeline"
TRANSFORMER_CLASS_NAME = "Flux2Transformer2DModel"
DEFAULT_LATENT_ROWS = 128
"""The pipeline's ``default_sample_size``: 128 latent rows of the VAE's 8 px, 1024 px."""
TEXT_TOKENS = 512
"""Qwen3 tokens per prompt, padded (the pipeline's ``max_sequence_length``): klein was
trained with 512, padding included (no attention mask reaches the transformer)."""


def is_flux2(pipe) -> bool:  # noqa: ANN001
    return type(pipe).__name__ == PIPELINE_CLASS_NAME


def is_flux2_transformer(denoiser: torch.nn.Module) -> bool:
    return type(denoiser).__name__ == TRANSFORMER_CLASS_NAME


def is_flux2_config(denoiser_config: dict) -> bool:
    """A FLUX.2 transformer's config (saved ones name their class; ones built in code are
    known by FLUX.2's timestep-guidance width without SD 3's pooled projection)."""
    if denoiser_config.get("_class_name") == TRANSFORMER_CLASS_NAME:
        return True
    keys = denoiser_config.keys()
    return "timestep_guidance_channels" in keys and "pooled_projection_dim" not in keys


def is_flux2_vae(vae: torch.nn.Module) -> bool:
    return type(vae).__name__ == "AutoencoderKLFlux2"


def check_guidance(pipe, guidance_scale: float) -> None:  # noqa: ANN001
    """FLUX.2-klein 4B (not Base) is guidance-distilled: its pipeline ignores CFG, and
    sampling it with CFG here would train a policy the model was never meant to run."""
    if is_flux2(pipe):
        check_index_guidance({**pipe.config, "_class_name": PIPELINE_CLASS_NAME}, guidance_scale)


def check_index_guidance(index: dict, guidance_scale: float) -> None:
    """``check_guidance`` from the pipeline's ``model_index.json``, before loading it."""
    distilled = index.get("_class_name") == PIPELINE_CLASS_NAME and index.get("is_distilled")
    if distilled and guidance_scale > 1:
        raise UserError(
            "this FLUX.2-klein model is guidance-distilled (is_distilled): use guidance 1 "
            "(sample.guidance_scale=1; `sample --guidance 1`), or FLUX.2-klein Base, which "
            "takes guidance"
        )


# ------------------------------------------------------------------ the transformer call


def _position_ids(t: Tensor, h: Tensor, w: Tensor, length: Tensor, batch: int) -> Tensor:
    return torch.cartesian_prod(t, h, w, length).unsqueeze(0).expand(batch, -1, -1)


def image_ids(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """[B, h w, 4] (0, row, column, 0) per latent patch, rows first (``_prepare_latent_ids``)."""
    zero = torch.zeros(1, dtype=torch.long, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    return _position_ids(zero, rows, cols, zero, batch)


def text_ids(batch: int, length: int, device: torch.device) -> Tensor:
    """[B, L, 4] (0, 0, 0, token) (``_prepare_text_ids``)."""
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return _position_ids(zero, zero, zero, torch.arange(length, device=device), batch)


def pack(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, h w, C] (``_pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, h w, C] -> [B, C, h, w]: ``pack``'s inverse."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def velocity(
    transformer: torch.nn.Module, latents: Tensor, timesteps: Tensor, hidden: Tensor
) -> Tensor:
    """The transformer's velocity for latent images ``[B, C, h, w]`` at ``timesteps`` in
    [0, 1000] (the scheduler's), conditioned on Qwen3 states ``hidden`` [B, L, D]."""
    b, _, h, w = latents.shape
    out = transformer(
        hidden_states=pack(latents),
        encoder_hidden_states=hidden,
        timestep=timesteps / 1000,  # the pipeline's scale; the model multiplies by 1000
        img_ids=image_ids(b, h, w, latents.device),
        txt_ids=text_ids(b, hidden.shape[1], latents.device),
        guidance=None,  # klein has no guidance embedding (guidance_embeds false)
    ).sample
    return unpack(out, h, w)


# ------------------------------------------------------------------ prompts


def encode_text(pipe, prompts: list[str]) -> Tensor:  # noqa: ANN001
    """[B, 512, 3 x Qwen3's width]: the pipeline's own ``encode_prompt`` (chat template,
    thinking off, layers 9, 18, 27)."""
    device = next(pipe.text_encoder.parameters()).device
    hidden, _ = pipe.encode_prompt(prompts, device=device, max_sequence_length=TEXT_TOKENS)
    return hidden


# ------------------------------------------------------------------ schedule


def shifted_timesteps(
    scheduler_config: dict, num_steps: int, image_tokens: int
) -> tuple[Tensor, Tensor]:
    """(timesteps [T], sigmas [T + 1]) as ``Flux2KleinPipeline`` sets them for an image of
    ``image_tokens`` latent patches: ``linspace(1, 1/N, N)`` shifted by its empirical mu."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    if image_tokens <= 0:
        raise UserError("FLUX.2's schedule depends on the image size: give its token count")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = compute_empirical_mu(image_seq_len=image_tokens, num_steps=num_steps)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    return scheduler.timesteps.float().clone(), scheduler.sigmas.double().clone()


# ------------------------------------------------------------------ decoding


def decoder_input(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """Latent images ``[B, 4 c, h, w]`` as the VAE's decoder takes them ``[B, c, 2h, 2w]``:
    its BatchNorm statistics undone, then the 2x2 patches unfolded (``_unpatchify_latents``)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    x = latents * std + mean
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


# ------------------------------------------------------------------ LoRA


DOUBLE_BLOCK_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]  # fmt: skip
"""The double (joint) blocks' attention projections, image and text streams."""


def lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Every attention projection: the double blocks' (as SD 3's) and each single block's
    fused QKV+MLP input and its output. The single blocks' ``attn.to_out`` is named in
    full: as a suffix it would also match the double blocks' ``to_out`` (a ModuleList,
    which peft cannot wrap)."""
    singles = [
        f"single_transformer_blocks.{i}.attn.{name}"
        for i in range(transformer.config.num_single_layers)
        for name in ("to_qkv_mlp_proj", "to_out")
    ]
    return DOUBLE_BLOCK_TARGETS + singles
