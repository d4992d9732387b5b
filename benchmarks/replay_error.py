"""How far a speed path's replayed log-probs drift from the sampled ones.

    python benchmarks/replay_error.py --arch sd15 --compile default [--steps 10]
    python benchmarks/replay_error.py --arch sd35m --resolution 512 (the flow SDE)
    python benchmarks/replay_error.py --arch flux2-klein --resolution 512 --dtype bf16
    python benchmarks/replay_error.py --arch sd15 --fused-lora (speed.fused_lora's layers)
    python benchmarks/replay_error.py --arch sd15 --half-norms (speed.half_norms)
    python benchmarks/replay_error.py --arch sd15 --compile default --channels-last
        (speed.channels_last: NHWC weights, Inductor's layout forced channels-last)
    python benchmarks/replay_error.py --arch sd15 --fp8 (memory.quantize=fp8's base)
    python benchmarks/replay_error.py --arch sd15 --batch 8 --micro-batch 1 (a real run's)
    python benchmarks/replay_error.py --compile default --cpu-autocast bf16 (no GPU: the
        pocket model in bf16 on the CPU; add --fused-roundings for Inductor's own roundings,
        --training-graph-sampling to sample through the training call's graph)

Samples a batch with the trainer's policy (random-weight model built from the
architecture's config, fp16 or --dtype bf16 autocast on a GPU, fp32 on the CPU unless
--cpu-autocast names a half precision), then
re-scores every stored action in the training path (gradients on, train mode), as the
first inner epoch does before any update: the importance ratio should be exactly one.
Prints, over the steps, the largest root-mean-square log-prob difference beside DDPO's
clip range (1e-4) and the largest fraction of actions it would clip: a speed path stays
off unless both are well below (a difference near 1e-4 clips updates that should not be).
Run it for each `speed.compile` mode on the GPU that will train.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch

from lowvram_ddpo.algorithms.steps import MicroBatch, policy_gradient_loss
from lowvram_ddpo.architectures import native_resolution, random_pipeline
from lowvram_ddpo.memory.checkpointing import enable_checkpointing
from lowvram_ddpo.memory.fp8_weights import store_weights_in_fp8
from lowvram_ddpo.models import DTYPES, make_trainable
from lowvram_ddpo.policy import build_policy
from lowvram_ddpo.rollout import image_tokens, sample_trajectories
from lowvram_ddpo.speed.channels_last import convolutions_in_channels_last
from lowvram_ddpo.speed.compile import compile_unet
from lowvram_ddpo.speed.half_norms import run_norms_in_half
from lowvram_ddpo.speed.lora_casts import skip_lora_input_casts
from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers
from lowvram_ddpo.speed.training_graph_sampling import through_training_graph
from lowvram_ddpo.text_encoding import encode_negative

CLIP_RANGE = 1e-4


def replay_error(
    arch: str,
    mode: str,
    steps: int,
    batch: int,
    resolution: int = 0,
    precision: str = "fp16",
    fused_lora: bool = False,
    micro_batch: int = 0,
    half_norms: bool = False,
    fp8: bool = False,
    cpu_autocast: str = "",
    fused_roundings: bool = False,
    seed: int = 0,
    checkpointing: bool = False,
    training_graph_sampling: bool = False,
    channels_last: bool = False,
) -> dict[str, object]:
    """``resolution`` 0: the architecture's own; ``precision`` of the base on a GPU;
    ``fused_lora``: the LoRA layers as ``speed.fused_lora`` computes them; ``micro_batch``:
    re-scored this many images at a time, as the trainer does (0: all ``batch`` at once).
    A micro-batch other than the sampling batch runs other kernels on a GPU, so it shows
    the replay error a real run has, not only the speed path's own. ``half_norms``: the
    norms as ``speed.half_norms`` runs them; ``fp8``: the base stored in fp8
    (``memory.quantize=fp8``). ``cpu_autocast`` ("bf16", "fp16"; without a GPU only): the
    base in that precision under the CPU's autocast, a stand-in for a GPU's rounding.
    ``fused_roundings``: Inductor rounds as it fuses (``speed.compile.inductor_options``
    off), the control for what the trainer's compile avoids. ``seed``: the random
    weights'. ``checkpointing``: the training call recomputes its forward
    (``memory.gradient_checkpointing``, as the trainer sets it). ``training_graph_sampling``:
    sampled through the training call's graph (``speed/training_graph_sampling.py``).
    ``channels_last``: ``speed.channels_last`` (NHWC weights; compiled, every graph laid out
    channels-last)."""
    micro_batch = micro_batch or batch
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    half = on_gpu or bool(cpu_autocast)
    dtype = DTYPES[precision if on_gpu else cpu_autocast] if half else torch.float32
    pipe = random_pipeline(arch, dtype, str(device), seed=seed)  # the LoRA's draws follow
    make_trainable(pipe.unet, 4, 4.0, [])  # the model family's default LoRA targets
    if fp8:
        store_weights_in_fp8(pipe.unet)
    if checkpointing:
        enable_checkpointing(pipe.unet)
    if half:
        skip_lora_input_casts(pipe.unet)  # as the trainer does under autocast
    if fused_lora:
        fuse_lora_layers(pipe.unet)
    if half_norms:
        run_norms_in_half(pipe.unet)
    if channels_last:
        convolutions_in_channels_last(pipe.unet)
    compile_unet(
        pipe.unet, mode, device, eager_roundings=not fused_roundings, channels_last=channels_last
    )
    resolution = resolution or native_resolution(arch)
    tokens = image_tokens(pipe.unet, pipe.vae, resolution)
    config = pipe.scheduler.config
    policy = build_policy("auto", config, pipe.unet.config, steps, 1.0, image_tokens=tokens)
    negative = encode_negative(pipe, "").to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=half)
    pipe.unet.eval()
    sampling = through_training_graph(pipe.unet) if training_graph_sampling else nullcontext()
    with autocast, sampling:
        samples = sample_trajectories(
            pipe, pipe.unet, policy, ["a photo"] * batch, negative, 5.0,
            resolution, torch.Generator().manual_seed(0),
        )  # fmt: skip
    samples = samples.to(device)
    pipe.unet.train()
    worst, clipped = 0.0, 0.0
    for k in range(policy.trainable_steps()):  # a flow model's sharp last step never trains
        squares, clips = 0.0, 0.0  # over the step's images, summed across micro-batches
        for rows in torch.arange(batch, device=device).split(micro_batch):
            step = MicroBatch(samples=rows, steps=torch.full((len(rows),), k, device=device))
            with autocast:
                _, metrics = policy_gradient_loss(
                    "ddpo-is", pipe.unet, policy, samples, step, torch.ones(batch, device=device),
                    negative, 5.0, CLIP_RANGE,
                )  # fmt: skip
            # approx_kl = mean(diff^2) / 2 over the micro-batch
            squares += 2 * float(metrics["approx_kl"]) * len(rows)
            clips += float(metrics["clipfrac"]) * len(rows)
        # the root of the step's mean squared difference bounds its typical |diff|
        worst = max(worst, (squares / batch) ** 0.5)
        clipped = max(clipped, clips / batch)
    return {
        "arch": arch,
        "compile": mode,
        "fused_lora": fused_lora,
        "half_norms": half_norms,
        "fp8": fp8,
        "fused_roundings": fused_roundings,
        "seed": seed,
        "checkpointing": checkpointing,
        "training_graph_sampling": training_graph_sampling,
        "channels_last": channels_last,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "dtype": str(dtype),
        "resolution": resolution,
        "steps": steps,
        "batch": batch,
        "micro_batch": micro_batch,
        "rms_log_prob_difference": worst,
        "clip_range": CLIP_RANGE,
        "ratio_to_clip_range": worst / CLIP_RANGE,
        "largest_clip_fraction": clipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="pocket")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=0, help="0: the model's own")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="on a GPU")
    parser.add_argument("--fused-lora", action="store_true", help="speed.fused_lora's layers")
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="images re-scored at a time (0: --batch)"
    )
    parser.add_argument("--half-norms", action="store_true", help="speed.half_norms's norms")
    parser.add_argument("--fp8", action="store_true", help="memory.quantize=fp8's base")
    parser.add_argument(
        "--cpu-autocast", default="", choices=["", "fp16", "bf16"],
        help="without a GPU: the base in this precision under CPU autocast",
    )  # fmt: skip
    parser.add_argument(
        "--fused-roundings", action="store_true",
        help="Inductor rounds as it fuses (the trainer rounds as eager does)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument(
        "--training-graph-sampling", action="store_true",
        help="sample through the training call's compiled graph",
    )  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="speed.channels_last")
    args = parser.parse_args()
    result = replay_error(
        args.arch, args.compile, args.steps, args.batch, args.resolution, args.dtype,
        args.fused_lora, args.micro_batch, args.half_norms, args.fp8, args.cpu_autocast,
        args.fused_roundings, args.seed, args.checkpointing, args.training_graph_sampling,
        args.channels_last,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
