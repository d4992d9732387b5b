"""Distil the pocket model into a latent consistency model (LCM, Luo et al. 2023).

    python -m lowvram_ddpo.pocket.distill_lcm --teacher lowvram_ddpo/pocket/weights/pocket-sd

The student is the teacher's UNet plus a guidance embedding (``time_cond_proj_dim``):
one UNet pass per step instead of two, and 2-8 steps instead of 20-50. Training follows
the consistency-distillation recipe of diffusers' ``train_lcm_distill_sd_wds.py``: a
DDIM solver step of the guided teacher from t_n to t_{n-k}, an EMA target network, and
the LCM boundary conditions ``c_skip``/``c_out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from torch import Tensor

from lowvram_ddpo.models import load_pipeline
from lowvram_ddpo.pocket import save_pipeline_half, world
from lowvram_ddpo.pocket.tokenizer import MAX_LENGTH
from lowvram_ddpo.policy.lcm import boundary_scalings, guidance_embedding

GUIDANCE_DIM = 256
DDIM_STEPS = 50  # the solver's grid: t in {19, 39, ..., 999}, skipping k = 20


def student_from_teacher(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    config = dict(teacher.config)
    config["time_cond_proj_dim"] = GUIDANCE_DIM
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), missing
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher
    return student


def x0_and_eps(output: Tensor, x: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    return (x - s * output) / a, output


def distill(
    teacher_dir: Path, out: Path, steps: int, batch: int, seed: int, started: float
) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pipe = load_pipeline(str(teacher_dir))
    teacher = pipe.unet.eval().requires_grad_(False)
    student = student_from_teacher(teacher).train()
    target = copy.deepcopy(student).requires_grad_(False)
    abar = pipe.scheduler.alphas_cumprod.float()
    k = pipe.scheduler.config.num_train_timesteps // DDIM_STEPS
    grid = torch.arange(1, DDIM_STEPS + 1) * k - 1  # 19, 39, ..., 999
    with torch.no_grad():
        ids = pipe.tokenizer(
            world.all_captions() + [""],
            padding="max_length",
            max_length=MAX_LENGTH,
            return_tensors="pt",
        ).input_ids
        embeds = pipe.text_encoder(ids)[0]
        uncond = embeds[-1:]
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=0.0)
    scaling = pipe.vae.config.scaling_factor
    for step in range(steps):
        images, scenes = world.batch(batch, rng)
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents = pipe.vae.encode(x).latent_dist.sample() * scaling
        cond = pipe.text_encoder(
            pipe.tokenizer(
                [s.caption for s in scenes],
                padding="max_length",
                max_length=MAX_LENGTH,
                return_tensors="pt",
            ).input_ids
        )[0].detach()
        index = torch.from_numpy(rng.integers(0, DDIM_STEPS, size=batch))
        t_start = grid[index]
        t_next = (t_start - k).clamp(min=0)
        noise = torch.randn_like(latents)
        noisy = pipe.scheduler.add_noise(latents, noise, t_start)
        w = torch.from_numpy(rng.uniform(2.0, 8.0, size=batch)).float()  # guidance - 1
        w_embed = guidance_embedding(w, GUIDANCE_DIM)

        c_skip0, c_out0 = boundary_scalings(t_start)
        raw = student(noisy, t_start, encoder_hidden_states=cond, timestep_cond=w_embed).sample
        pred_x0, _ = x0_and_eps(raw, noisy, abar[t_start])
        prediction = c_skip0 * noisy + c_out0 * pred_x0

        with torch.no_grad():
            both = teacher(
                torch.cat([noisy, noisy]),
                torch.cat([t_start, t_start]),
                encoder_hidden_states=torch.cat([cond, uncond.expand_as(cond)]),
            ).sample
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + (1 + w.view(-1, 1, 1, 1)) * (eps_c - eps_u)
            x0_teacher, _ = x0_and_eps(eps, noisy, abar[t_start])
            a_next = torch.where(t_next > 0, abar[t_next], abar[0]).view(-1, 1, 1, 1)
            x_next = a_next.sqrt() * x0_teacher + (1 - a_next).sqrt() * eps  # DDIM, eta = 0
            c_skip, c_out = boundary_scalings(t_next)
            out_t = target(x_next, t_next, encoder_hidden_states=cond, timestep_cond=w_embed)
            target_x0, _ = x0_and_eps(out_t.sample, x_next, abar[t_next])
            goal = c_skip * x_next + c_out * target_x0

        loss = (torch.sqrt((prediction - goal) ** 2 + 1e-6) - 1e-3).mean()  # pseudo-Huber
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_target, p in zip(target.parameters(), student.parameters(), strict=True):
                p_target.lerp_(p, 0.05)
        if step % 250 == 0 or step == steps - 1:
            print(
                f"[{time.perf_counter() - started:7.1f}s] lcm {step}/{steps} "
                f"loss {loss.item():.4f}",
                flush=True,
            )

    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    lcm = LatentConsistencyModelPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=target.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline_half(lcm, out)
    return out


def lcm_accuracy(folder: Path, classifier_path: Path, steps: int = 4, seeds: int = 2) -> dict:
    """Prompt accuracy of the distilled model with LatentConsistencyModelPipeline itself."""
    from lowvram_ddpo.pocket.classifier import load_classifier, prompt_accuracy

    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(classifier_path)
    captions = world.all_captions()
    images = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        images.append(
            pipe(
                captions,
                num_inference_steps=steps,
                guidance_scale=6.0,
                height=world.SIZE,
                width=world.SIZE,
                generator=generator,
                output_type="pt",
            ).images
        )
    accuracy = prompt_accuracy(classifier, torch.cat(images), captions * seeds)
    return {
        "prompt_accuracy": accuracy,
        "steps": steps,
        "guidance_scale": 6.0,
        "images": len(captions) * seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    weights = Path("lowvram_ddpo/pocket/weights")
    parser.add_argument("--teacher", type=Path, default=weights / "pocket-sd")
    parser.add_argument("--out", type=Path, default=weights / "pocket-lcm")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    distill(args.teacher, args.out, args.steps, args.batch, args.seed, started)
    report = lcm_accuracy(args.out, args.teacher.parent / "world_classifier.safetensors")
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"[{time.perf_counter() - started:7.1f}s] LCM prompt accuracy "
        f"{report['prompt_accuracy']:.3f} in {report['steps']} steps -> {args.out}"
    )


if __name__ == "__main__":
    main()
