"""Train the pocket flow model: a tiny Stable Diffusion 3 (MMDiT, rectified flow) on the
pocket world, on a CPU.

    python -m lowvram_ddpo.pocket.train_flow --out lowvram_ddpo/pocket/weights

One command, fixed seeds, well under an hour on 2 CPU cores. It reuses the shipped
pocket model's VAE (32 px <-> 8x8x4 latents) and world classifier, and trains an
``SD3Transformer2DModel`` with two CLIP text encoders (``CLIPTextModelWithProjection``,
as SD 3.x's CLIP-L and CLIP-G; no T5) on the rectified-flow loss: ``x_s = (1 - s) x0 +
s noise``, the model predicts ``noise - x0``, with SD 3's shifted noise levels and 10%
caption dropout (for classifier-free guidance) and an EMA. The result is a
``StableDiffusion3Pipeline`` folder (``pocket-flow``) that diffusers and lowvram-ddpo load
like SD 3.5; its prompt accuracy is measured with Flow-GRPO's SDE sampler.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from torch import Tensor
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lowvram_ddpo.models import POCKET_DIR, load_pipeline
from lowvram_ddpo.pocket import save_pipeline_half, world
from lowvram_ddpo.pocket.classifier import load_classifier, prompt_accuracy
from lowvram_ddpo.pocket.tokenizer import MAX_LENGTH, build_tokenizer
from lowvram_ddpo.pocket.train import (
    cosine_lr,
    encode_dataset,
    log,
    script_arguments,
    start,
    training_batch,
    world_images,
)

SHIFT = 3.0
"""SD 3's noise-level shift (its scheduler_config), used in training and sampling alike."""
TEXT_WIDTH = 32
"""Each CLIP's width; SD3 concatenates the two (the transformer's joint_attention_dim)."""


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=world.SIZE // 4,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=64,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=world.SIZE // 4,
        dual_attention_layers=(0, 1),  # SD 3.5 Medium's second attention in its first blocks
        qk_norm="rms_norm",
    )


def build_text_encoder(tokenizer) -> CLIPTextModelWithProjection:  # noqa: ANN001
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=3,  # SD3 reads the penultimate layer
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=TEXT_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def shipped_vae() -> AutoencoderKL:
    """The pocket model's VAE; SD3's pipeline also adds a ``shift_factor`` (0 here)."""
    vae = AutoencoderKL.from_pretrained(POCKET_DIR / "pocket-sd" / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def build_pipeline(vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    tokenizer = build_tokenizer(world.vocabulary())
    return StableDiffusion3Pipeline(
        transformer=build_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae,
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer),
        tokenizer_2=build_tokenizer(world.vocabulary()),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def shifted(u: Tensor) -> Tensor:
    """SD 3's shifted noise level: more training at high noise, where layouts form."""
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def train_flow(
    pipe: StableDiffusion3Pipeline,
    latents: Tensor,
    captions: list[str],
    steps: int,
    batch: int,
    rng: np.random.Generator,
    started: float,
) -> None:
    """The transformer and both text encoders together, on the rectified-flow loss; the
    pipeline ends with their EMA weights."""
    live = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    emas = [copy.deepcopy(m) for m in live]
    params = [p for m in live for p in m.parameters()]
    for m in live:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    texts = np.array(captions + [""], dtype=object)
    empty = len(captions)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, warmup=200)
        pick, rows = training_batch(len(latents), batch, empty, generator)
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompt=list(texts[rows.numpy()]), prompt_2=None, prompt_3=None,
            do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH,
        )  # fmt: skip
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = shifted(torch.rand(batch, generator=generator)).view(-1, 1, 1, 1)
        x = (1 - sigma) * x0 + sigma * noise
        velocity = pipe.transformer(
            hidden_states=x,
            timestep=sigma.flatten() * 1000,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in zip(emas, live, strict=True):
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log(f"flow {step}/{steps} loss {loss.item():.4f}", started)
    for ema in emas:
        ema.eval().requires_grad_(False)
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2 = emas


def measure_accuracy(folder: Path, seeds: int, steps: int = 10, guidance: float = 4.5) -> dict:
    """Prompt accuracy over every caption of the world, with the SDE sampler Flow-GRPO
    trains with (noise level 0.7)."""
    from lowvram_ddpo.policy import FlowSDEPolicy

    pipe = load_pipeline(str(folder))
    classifier = load_classifier(POCKET_DIR / "world_classifier.safetensors")
    policy = FlowSDEPolicy(pipe.scheduler.config, steps)
    images, captions = world_images(pipe, policy, guidance, seeds)
    return {
        "prompt_accuracy": prompt_accuracy(classifier, images, captions),
        "images": len(images),
        "sampler": "flow-sde",
        "steps": steps,
        "noise_level": policy.noise_level,
        "guidance_scale": guidance,
    }


def main() -> None:
    parser = script_arguments(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    args = parser.parse_args()
    rng, started = start(args)
    vae = shipped_vae()
    latents, captions = encode_dataset(vae, args.dataset, rng)
    latents = latents * vae.config.scaling_factor
    log(f"dataset {tuple(latents.shape)}", started)
    pipe = build_pipeline(vae)
    train_flow(pipe, latents, captions, args.steps, args.batch, rng, started)
    folder = args.out / "pocket-flow"
    save_pipeline_half(pipe, folder)
    # measured on what was saved, loaded back the way users load it
    report = measure_accuracy(folder, seeds=2)
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    (folder / "training_report.json").write_text(json.dumps(report, indent=2))
    log(f"prompt accuracy {report['prompt_accuracy']:.3f} -> {folder}", started)


if __name__ == "__main__":
    main()
