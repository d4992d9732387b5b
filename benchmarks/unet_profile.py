"""Where a UNet call's time goes: the host's launches or the GPU's kernels, and which.

    python benchmarks/unet_profile.py --arch sd15 --variants eager,cudagraphs
    python benchmarks/unet_profile.py --arch pocket --variants eager --repeats 3   # CPU

SD 1.x-shaped UNets only (``sd15``, ``pocket``): SDXL's needs its added conditioning and
the flow models have transformers.

Builds the architecture's random-weight UNet with the trainer's LoRA (rank 4 on its
default targets, fp32 adapter, fp16 base under autocast on a GPU, peft's input casts
skipped as the trainer does), then times the trainer's two calls: a guided sampling step
(eval, no gradients, ``--sample-batch`` images = twice as many latents) and a guided
training micro-step (train mode, forward + backward, ``--micro-batch`` images). For each
variant it prints milliseconds per call (median of ``--repeats``, CUDA events) and, from
one profiled call, the GPU kernels' summed time by kind (matmul, convolution, attention,
normalisation, elementwise, copy and cast, other) and their count. A call whose wall time
is well above its kernels' sum waits on the host; one near it waits on the kernels, and
the table says which kernels to cut (issue 12: MFU training >= 30%, sampling >= 40%).

Variants: ``eager``; ``channels_last`` (the UNet's weights and inputs in NHWC, the layout
tensor-core convolutions use); ``no-lora`` (the adapters switched off: their own cost);
``cudagraphs`` (``speed.compile=cudagraphs``, traced once per call kind before timing;
its graphs read the weights in place, ``speed/cudagraphs_backend.py``);
``torch-cudagraphs`` (the same through torch's own backend, which copies every weight
into the graphs' pool before each replay: what ours saves);
``fused-lora`` (``speed.fused_lora``: each LoRA layer's up-projection, scaling and sum in
one addmm); ``half-norms`` (``speed.half_norms``: GroupNorm and LayerNorm in fp16 under
autocast, no casts around them); ``fp8`` (``memory.quantize=fp8``: the base stored in fp8,
dequantised per call); several joined by "+" (``channels_last+half-norms``).
Each call also lists its ``--top`` most expensive kernels by name (milliseconds and
count): which copies and casts are they?

``--sweep 1,2,4,8`` times both calls at each of those images per call instead (guided:
twice the latents), without the kernel profile: how a call's time grows with its batch.
The time model (``speed/time_model.py``) takes the arithmetic to run at one rate at every
batch, calibrated at 16 latents; the RLCM preset's epoch on the H100 (2026-11-26, CUDA
graphs, training 2 latents per call) implies about a third of that rate, loop included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from unittest import mock

import torch

import lowvram_ddpo.speed.compile as compiling
from lowvram_ddpo.architectures import native_resolution, random_pipeline
from lowvram_ddpo.memory.fp8_weights import store_weights_in_fp8
from lowvram_ddpo.models import make_trainable
from lowvram_ddpo.rollout import latent_shape
from lowvram_ddpo.speed.compile import compile_unet
from lowvram_ddpo.speed.half_norms import run_norms_in_half
from lowvram_ddpo.speed.kernel_kinds import kernel_times, kind_of, milliseconds_by_kind
from lowvram_ddpo.speed.lora_casts import skip_lora_input_casts
from lowvram_ddpo.speed.lora_fusion import fuse_lora_layers

VARIANTS = (
    "eager",
    "channels_last",
    "no-lora",
    "cudagraphs",
    "torch-cudagraphs",
    "fused-lora",
    "half-norms",
    "fp8",
)


def build_unet(
    arch: str, device: torch.device, variant: str
) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The UNet of ``variant`` (one of ``VARIANTS``, or several joined by "+") and the
    shape of one latent at the model's resolution."""
    features = set(variant.split("+"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = random_pipeline(arch, dtype, str(device))
    unet = pipe.unet
    make_trainable(unet, 4, 4.0, [])
    if "fp8" in features:  # memory.quantize=fp8: each call dequantises the base
        store_weights_in_fp8(unet)
    if device.type == "cuda":
        skip_lora_input_casts(unet)
    if "channels_last" in features:
        unet.to(memory_format=torch.channels_last)
    if "fused-lora" in features:
        fuse_lora_layers(unet)
    if "half-norms" in features:
        run_norms_in_half(unet)
    if "no-lora" in features:
        unet.disable_adapters()  # also stops their gradients: sampling alone is timed
    if "cudagraphs" in features:
        compile_unet(unet, "cudagraphs", device)
    if "torch-cudagraphs" in features:
        with mock.patch.object(compiling, "cudagraphs_compiler", lambda: "cudagraphs"):
            compile_unet(unet, "cudagraphs", device)
    return unet, latent_shape(unet, pipe.vae, native_resolution(arch))


def calls(
    unet: torch.nn.Module,
    latent: tuple[int, ...],
    device: torch.device,
    batches: tuple[int, int],
    nhwc: bool,
) -> dict[str, tuple[Callable[[], None], contextlib.AbstractContextManager]]:
    """The sampling step and the training micro-step, on fixed random inputs, each with
    the scope its timed calls run in. As in the trainer, the sampling calls share one
    autocast region (a batch's steps: the LoRA weights' half copies are cast once and
    cached) and each training call has its own (a micro-step)."""
    config = unet.config
    text = (77, config.cross_attention_dim)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    layout = torch.channels_last if nhwc else torch.contiguous_format

    def inputs(images: int) -> tuple[torch.Tensor, ...]:
        latents = 2 * images  # guidance doubles the batch
        x = torch.randn(latents, *latent, device=device).to(memory_format=layout)
        t = torch.full((latents,), 500, device=device)
        return x, t, torch.randn(latents, *text, device=device)

    sampling_inputs, training_inputs = inputs(batches[0]), inputs(batches[1])

    def sampling() -> None:  # inside the autocast region of its scope
        unet.eval()
        with torch.no_grad():
            unet(*sampling_inputs[:2], encoder_hidden_states=sampling_inputs[2])

    def training() -> None:
        unet.train()
        with autocast:
            out = unet(*training_inputs[:2], encoder_hidden_states=training_inputs[2]).sample
        out.float().square().mean().backward()

    timed = {"sampling": (sampling, autocast)}
    if any(p.requires_grad for p in unet.parameters()):  # no-lora: nothing to train
        timed["training"] = (training, contextlib.nullcontext())
    return timed


def median_ms(call: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def kernel_time(call: Callable[[], None], device: torch.device, top: int = 0) -> dict[str, object]:
    """One profiled call: the device kernels' summed milliseconds by kind, their count,
    and the ``top`` names that took longest (on a CPU, the aten ops' self time instead)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    timed = kernel_times(prof.events(), on_device=device.type == "cuda")
    by_name: Counter[str] = Counter()
    calls_of: Counter[str] = Counter()
    for name, us in timed:
        by_name[name[:120]] += us / 1000
        calls_of[name[:120]] += 1
    return {
        "kernels": len(timed),
        "kernel_ms": round(sum(us for _, us in timed) / 1000, 2),
        "by_kind_ms": milliseconds_by_kind(timed),
        "top_kernels": [
            {"name": name, "ms": round(ms, 3), "count": calls_of[name], "kind": kind_of(name)}
            for name, ms in by_name.most_common(top)
        ],
    }


def profile_variant(args: argparse.Namespace, variant: str, device: torch.device) -> dict:
    unet, latent = build_unet(args.arch, device, variant)
    nhwc = "channels_last" in variant.split("+")
    sweep = [int(images) for images in args.sweep.split(",")] if args.sweep else []
    rows = {}
    for images in sweep or [None]:
        batches = (images, images) if images else (args.sample_batch, args.micro_batch)
        for name, (call, scope) in calls(unet, latent, device, batches, nhwc).items():
            with scope:
                for _ in range(args.warmup):  # cuDNN's choices, dynamo's traces, graphs recorded
                    call()
                ms = round(median_ms(call, device, args.repeats), 2)
                if images:  # a point of the batch curve: its time alone
                    rows[f"{name}@{images}"] = {
                        "images": images,
                        "latents": 2 * images,
                        "ms_per_call": ms,
                    }
                else:
                    rows[name] = {"ms_per_call": ms} | kernel_time(call, device, args.top)
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=["sd15", "pocket"])
    parser.add_argument("--variants", default="eager,cudagraphs")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per sampling step")
    parser.add_argument("--micro-batch", type=int, default=4, help="images per micro-step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="kernels listed by name per call")
    parser.add_argument(
        "--sweep",
        default="",
        help="images per call to time both calls at, e.g. 1,2,4,8 (no kernel profile): how "
        "the time of a call grows with its batch, the time model's small-batch regime",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = args.variants.split(",")
    unknown = {part for v in variants for part in v.split("+")} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    rows = {}
    for variant in variants:  # a JSON line as each ends: a cut-off run keeps what it had
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows[variant] = profile_variant(args, variant, device)
        peak = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
        print(json.dumps({
            "arch": args.arch,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "sample_batch": args.sample_batch,
            "micro_batch": args.micro_batch,
            "variant": variant,
            "peak_reserved_gib": None if peak is None else round(peak, 2),  # the graphs' pools
            "calls": rows[variant],
        }), flush=True)  # fmt: skip
    for variant, calls_of_variant in rows.items():  # the table a reader needs first
        for call, row in calls_of_variant.items():
            if "kernels" not in row:  # a point of a sweep
                per_latent = row["ms_per_call"] / row["latents"]
                print(f"{variant:<13} {call:<11} {row['ms_per_call']:8.2f} ms/call "
                      f"{per_latent:7.2f} ms per latent", flush=True)  # fmt: skip
                continue
            kinds = ", ".join(f"{k} {ms}" for k, ms in row["by_kind_ms"].items())
            print(
                f"{variant:<13} {call:<8} {row['ms_per_call']:8.2f} ms/call  kernels "
                f"{row['kernels']:5d} summing {row['kernel_ms']:8.2f} ms: {kinds}",
                flush=True,
            )


if __name__ == "__main__":
    main()
