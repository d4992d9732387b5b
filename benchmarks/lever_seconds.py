"""What two memory levers cost in compute, measured on this machine's CPU with
real-shaped models (random weights, fp32): a proxy until a GPU run replaces it.

    python benchmarks/lever_seconds.py [--repeats 2]

- gradient checkpointing: one DDPO training micro-step (micro-batch 1, classifier-free
  guidance doubles it, LoRA rank 4) of the SD 1.5 UNet at 512 px, with and without;
- VAE tiling: decoding one 1024 px image with SDXL's VAE, whole and in 512 px tiles.

Both are ratios of arithmetic done, which a GPU changes less than absolute times (a GPU
may hide part of the recomputation's cost behind memory traffic). Run it alone: it
measures wall-clock time. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lowvram_ddpo.algorithms.steps import MicroBatch, policy_gradient_loss
from lowvram_ddpo.architectures import build_components
from lowvram_ddpo.memory.checkpointing import enable_checkpointing
from lowvram_ddpo.models import attach_lora, use_vae_tiling
from lowvram_ddpo.policy import DDIMPolicy
from lowvram_ddpo.rollout import Trajectories
from lowvram_ddpo.text_encoding import TextEmbeds


def seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``work`` after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def training_step(checkpointing: bool) -> Callable[[], None]:
    parts = build_components("sd15", "cpu", torch.float32)
    unet = parts.unet
    params = attach_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    if checkpointing:
        enable_checkpointing(unet)
    unet.train()
    policy = DDIMPolicy(parts.scheduler_config, num_steps=50, eta=1.0)
    embeds = torch.randn(1, 77, 768)
    samples = Trajectories(
        prompts=["a cat"],
        prompt_embeds=embeds,
        latents=torch.randn(1, 2, 4, 64, 64),
        log_probs=torch.zeros(1, 1),
        timesteps=policy.timesteps()[:1],
        images=None,
    )
    batch = MicroBatch(samples=torch.tensor([0]), steps=torch.tensor([0]))
    negative = TextEmbeds(torch.randn(1, 77, 768))

    def step() -> None:
        loss, _ = policy_gradient_loss(
            "ddpo-is", unet, policy, samples, batch, torch.ones(1), negative, 5.0, 1e-4
        )
        loss.backward()
        for p in params:
            p.grad = None

    return step


def decode(tiling: bool) -> Callable[[], None]:
    vae = build_components("sdxl", "cpu", torch.float32).vae
    use_vae_tiling(vae, tiling)
    z = torch.randn(1, 4, 128, 128)

    @torch.no_grad()
    def work() -> None:
        vae.decode(z / vae.config.scaling_factor)

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    plain = seconds(training_step(False), args.repeats)
    recomputed = seconds(training_step(True), args.repeats)
    rows.append(("SD 1.5 training micro-step, 512 px, CFG", "checkpointing", plain, recomputed))
    whole = seconds(decode(False), args.repeats)
    tiled = seconds(decode(True), args.repeats)
    rows.append(("SDXL VAE decode, one 1024 px image", "512 px tiles", whole, tiled))
    threads = torch.get_num_threads()
    print(f"CPU, {threads} threads, fp32, median of {args.repeats} after a warm-up:\n")
    print("| work | lever | seconds without | seconds with | cost |")
    print("|---|---|---|---|---|")
    for work, lever, off, on in rows:
        print(f"| {work} | {lever} | {off:.1f} | {on:.1f} | {on / off - 1:+.0%} |")


if __name__ == "__main__":
    main()
