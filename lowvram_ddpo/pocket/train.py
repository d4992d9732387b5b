"""Train the pocket Stable Diffusion from scratch on the pocket world, on a CPU.

    python -m lowvram_ddpo.pocket.train --out lowvram_ddpo/pocket/weights

One command, fixed seeds, under an hour on 2 CPU cores. Phases:

1. a tiny ``AutoencoderKL`` (32 px <-> 8x8x4 latents);
2. the world classifier (for measuring prompt accuracy);
3. the ``UNet2DConditionModel`` and the ``CLIPTextModel`` together, on the epsilon
   loss with 10% caption dropout (for classifier-free guidance) and an EMA;
4. the pipeline is saved with ``save_pretrained`` and its prompt accuracy measured;
5. the pocket LCM is distilled from it (``distill_lcm.py``) and measured in 4 steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import Tensor
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from lowvram_ddpo.architectures import SD_SCHEDULER
from lowvram_ddpo.models import load_pipeline
from lowvram_ddpo.pocket import save_pipeline_half, world
from lowvram_ddpo.pocket.classifier import (
    HEADS,
    WorldClassifier,
    prompt_accuracy,
    save_classifier,
)
from lowvram_ddpo.pocket.tokenizer import MAX_LENGTH, build_tokenizer
from lowvram_ddpo.policy import PolicyStep


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)


# ---------------------------------------------------------------- models


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=world.SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int, tokenizer) -> CLIPTextModel:  # noqa: ANN001
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# ---------------------------------------------------------------- phases


def train_vae(steps: int, rng: np.random.Generator, started: float) -> AutoencoderKL:
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3)
        x = to_tensor(world.batch(32, rng)[0])
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x)
        loss = loss + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {loss.item():.4f}", started)
    return vae.eval()


def train_classifier(steps: int, rng: np.random.Generator, started: float) -> WorldClassifier:
    """Trained on rendered images, blurred and noised at random so that it also reads the
    softer images a generative model draws."""
    model = WorldClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    indices = {k: {v: i for i, v in enumerate(vals)} for k, vals in HEADS.items()}
    for step in range(steps):
        images, scenes = world.batch(64, rng)
        x = (to_tensor(images) + 1) / 2
        x = _augment(x, rng)
        logits = model(x)
        loss = sum(
            F.cross_entropy(logits[k], torch.tensor([indices[k][getattr(s, k)] for s in scenes]))
            for k in indices
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier {step}/{steps} loss {loss.item():.4f}", started)
    return model.eval()


def _augment(x: Tensor, rng: np.random.Generator) -> Tensor:
    sigma = float(rng.uniform(0.01, 1.2))
    radius = 2
    kernel_1d = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(3, 1, -1, -1)
    x = F.conv2d(F.pad(x, [radius] * 4, mode="replicate"), kernel, groups=3)
    noise = torch.from_numpy(rng.normal(0, rng.uniform(0, 0.08), size=x.shape)).float()
    return (x + noise).clamp(0, 1)


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, count: int, rng: np.random.Generator
) -> tuple[Tensor, list[str]]:
    """A fixed set of scenes, encoded once: [count, 4, 8, 8] latent means and captions."""
    latents, captions = [], []
    for _ in range(count // 256):
        images, scenes = world.batch(256, rng)
        latents.append(vae.encode(to_tensor(images)).latent_dist.mode())
        captions += [s.caption for s in scenes]
    return torch.cat(latents), captions


def training_batch(
    count: int, batch: int, empty: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A denoiser's training batch: (indices of its latents, indices of their captions),
    10% of the captions replaced by the empty one at index ``empty`` (caption dropout, so
    the model also learns the unconditional prediction classifier-free guidance needs)."""
    pick = torch.randint(count, (batch,), generator=generator)
    drop = torch.rand(batch, generator=generator) < 0.1
    return pick, torch.where(drop, torch.full_like(pick, empty), pick)


def train_denoiser(
    latents: Tensor,
    captions: list[str],
    tokenizer,  # noqa: ANN001
    steps: int,
    batch: int,
    rng: np.random.Generator,
    started: float,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer), tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ids = tokenizer(
        captions + [""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    ).input_ids
    empty = len(captions)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, warmup=200)
        pick, token_rows = training_batch(len(latents), batch, empty, generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, SD_SCHEDULER["num_train_timesteps"], (batch,), generator=generator)
        embeds = text_encoder(ids[token_rows])[0]
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds)
        loss = F.mse_loss(prediction.sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for p_ema, p in zip(ema.parameters(), live.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == steps - 1:
            log(f"denoiser {step}/{steps} loss {loss.item():.4f}", started)
    return ema_unet.eval(), ema_text.eval()


@torch.no_grad()
def world_images(
    pipe: DiffusionPipeline, policy: PolicyStep, guidance: float, seeds: int
) -> tuple[Tensor, list[str]]:
    """Every caption of the world drawn once per seed (0, 1, ...) by ``policy``, as the
    trainer samples: (images, their captions)."""
    from lowvram_ddpo.rollout import sample_trajectories
    from lowvram_ddpo.text_encoding import encode_negative

    captions = world.all_captions()
    negative = encode_negative(pipe, "")
    images = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(captions), 64):
            chunk = captions[start : start + 64]
            images.append(
                sample_trajectories(
                    pipe, pipe.unet, policy, chunk, negative, guidance, world.SIZE, generator
                ).images
            )
    return torch.cat(images), captions * seeds


def measure_accuracy(
    pipe: StableDiffusionPipeline, classifier: WorldClassifier, seeds: int, steps: int = 20
) -> dict:
    """Prompt accuracy over every caption of the world, with the DDIM sampler DDPO uses."""
    from lowvram_ddpo.policy import DDIMPolicy

    policy = DDIMPolicy(pipe.scheduler.config, steps, eta=1.0)
    all_images, captions = world_images(pipe, policy, 5.0, seeds)
    accuracy = prompt_accuracy(classifier, all_images, captions)
    return {
        "prompt_accuracy": accuracy,
        "images": len(all_images),
        "ddim_steps": steps,
        "eta": 1.0,
        "guidance_scale": 5.0,
    }


def script_arguments(description: str) -> argparse.ArgumentParser:
    """The options every pocket training script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("lowvram_ddpo/pocket/weights"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dataset", type=int, default=51200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def start(args: argparse.Namespace) -> tuple[np.random.Generator, float]:
    """Threads and seeds fixed; (the script's numpy generator, its start time)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return np.random.default_rng(args.seed), time.perf_counter()


def main() -> None:
    parser = script_arguments(__doc__.split("\n")[1])
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=9000)
    parser.add_argument("--lcm-steps", type=int, default=3000, help="0: no pocket LCM")
    args = parser.parse_args()
    rng, started = start(args)
    tokenizer = build_tokenizer(world.vocabulary())

    vae = train_vae(args.vae_steps, rng, started)
    classifier = train_classifier(args.classifier_steps, rng, started)
    latents, captions = encode_dataset(vae, args.dataset, rng)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    log(f"dataset {tuple(latents.shape)}, scaling_factor {vae.config.scaling_factor:.4f}", started)
    unet, text_encoder = train_denoiser(
        latents, captions, tokenizer, args.denoiser_steps, args.batch, rng, started
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline_half(pipe, out / "pocket-sd")
    save_classifier(classifier, out / "world_classifier.safetensors")
    # measured on what was saved, loaded back the way users load it
    report = measure_accuracy(load_pipeline(str(out / "pocket-sd")), classifier, seeds=2)
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    (out / "pocket-sd" / "training_report.json").write_text(json.dumps(report, indent=2))
    log(f"prompt accuracy {report['prompt_accuracy']:.3f} -> {out}", started)
    if args.lcm_steps > 0:
        distill_and_report(out, args.lcm_steps, args.seed, started)


def distill_and_report(out: Path, steps: int, seed: int, started: float) -> None:
    """Phase 5: the pocket LCM, distilled from the model just saved."""
    from lowvram_ddpo.pocket.distill_lcm import distill, lcm_accuracy

    distill(out / "pocket-sd", out / "pocket-lcm", steps, 32, seed, started)
    report = lcm_accuracy(out / "pocket-lcm", out / "world_classifier.safetensors")
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    (out / "pocket-lcm" / "training_report.json").write_text(json.dumps(report, indent=2))
    log(f"LCM prompt accuracy {report['prompt_accuracy']:.3f} -> {out / 'pocket-lcm'}", started)


if __name__ == "__main__":
    main()
