"""What decoding several images per VAE call saves (``memory.decode_batch``).

    python benchmarks/decode_batch.py --arch sd15                 # on a GPU machine
    python benchmarks/decode_batch.py --arch pocket --repeats 1   # CPU smoke run
    python benchmarks/decode_batch.py --arch sd15 --variants eager,compiled --widths 2,4

Builds the architecture's random-weight VAE (fp16 on a GPU, fp32 on a CPU) and decodes
``--images`` latents at the model's resolution through ``rollout.decode_latents`` (the
trainer's decode, under autocast in fp16 as the trainer runs it) at each width of
``--widths``, timing the median of ``--repeats`` (after one warm-up: cuDNN's choices) with
the peak memory allocated on a GPU. Prints a JSON line per width: milliseconds per image,
the speed-up over one image per call, the peak, and the decode's working memory measured
(the peak over what was allocated before it) beside the memory estimate's for the same
width: the meta device's (``MetaRun.decode``, which sees no cuDNN workspace) and the
estimate's calibrated one (``calibration.DECODE_WORKING_GROWTH``, x1.44: on an H100,
2026-11-27, the sampling phase, decoding 4 images per call, peaked ~1.1 GiB above the
meta figure). This says whether the decode alone is where, and recalibrates the factor.

``--variants eager,half,compiled`` times each width again outside autocast in the VAE's
own dtype (``speed.half_decode``: its estimate is that path's), then with the decoder
compiled by Inductor for that width (``speed.compile_decoder``,
``speed/compile_decoder.py``): a row's ``first_call_seconds`` is its first call (the
compile; ``graphs_compiled`` 1 where it compiled), its peaks those of the calls after it,
its ``eager_ms_per_image`` the eager row's, and ``max_abs_difference`` how far its images
lie from eager's (the rewards see them; the policy's log-probabilities do not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from lowvram_ddpo.architectures import native_resolution, random_pipeline
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.memory.calibration import decode_working_bytes
from lowvram_ddpo.memory.estimate import meta_run
from lowvram_ddpo.rollout import decode_latents, latent_shape
from lowvram_ddpo.speed.compile_decoder import DecodeShape, compile_decoder

VARIANTS = ("eager", "half", "compiled", "compiled-half")
"""Run in this order (a decoder once compiled stays so): under autocast as the trainer
decodes by default; outside it in the VAE's own dtype (``speed.half_decode``); compiled
(``speed.compile_decoder``); both."""


def to_stderr(line: str) -> None:
    """The compile's lines: standard output carries only the JSON rows."""
    print(line, file=sys.stderr, flush=True)


def timed(
    decode: Callable[[], object], repeats: int, after_first: Callable[[], None]
) -> tuple[float, float]:
    """(seconds of the first call: a compile, cuDNN's choices; median seconds after);
    ``after_first`` runs between them."""
    started = time.perf_counter()
    decode()  # ends with a copy to the host: the GPU's work is done
    first = time.perf_counter() - started
    after_first()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode()
        times.append(time.perf_counter() - started)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--widths", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=0, help="0: the model's own")
    parser.add_argument("--variants", default="eager", help=f"of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    variants.sort(key=VARIANTS.index)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.float16 if on_gpu else torch.float32
    pipe = random_pipeline(args.arch, dtype, device)
    resolution = args.resolution or native_resolution(args.arch)
    shape = latent_shape(pipe.unet, pipe.vae, resolution)
    latents = torch.randn(args.images, *shape, device=device)
    estimate = estimated_decode(args.arch, resolution, fp16=on_gpu)
    one = None
    eager: dict[int, tuple[float, torch.Tensor]] = {}  # width: (seconds, images)
    for variant in variants:
        for width in (int(w) for w in args.widths.split(",")):
            compiled, own_dtype = variant.startswith("compiled"), variant.endswith("half")
            if compiled:  # in place, for this width (other widths eager)
                compiled_for = DecodeShape.of_run(pipe.vae, width, args.images, resolution)
                compile_decoder(pipe.vae, torch.device(device), compiled_for, say=to_stderr)
            before = torch.cuda.memory_allocated() if on_gpu else 0
            reset_peak = torch.cuda.reset_peak_memory_stats if on_gpu else lambda: None
            if not compiled:  # as before 2026-11-27: the first call's peak counts
                reset_peak()
            graphs = counters["stats"]["unique_graphs"]
            images: list[torch.Tensor] = []

            def decode(
                width: int = width, images: list[torch.Tensor] = images, own: bool = own_dtype
            ) -> None:
                with torch.autocast(device, dtype=dtype, enabled=on_gpu):  # as the trainer
                    decoded = decode_latents(pipe.vae, latents, batch_size=width, own_dtype=own)
                    images[:] = [decoded]

            # a compiled row's peak leaves its compile out (the calls after it)
            first, seconds = timed(decode, args.repeats, reset_peak if compiled else lambda: None)
            one = one or seconds
            peak = torch.cuda.max_memory_allocated() if on_gpu else None
            estimated = estimate(width, own_dtype)
            row = {
                "arch": args.arch,
                "resolution": resolution,
                "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                "variant": variant,
                "decode_batch": width,
                "ms_per_image": round(1e3 * seconds / args.images, 2),
                "speed_up": round(one / seconds, 3),
                "first_call_seconds": round(first, 2),
                "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
                "peak_allocated_bytes": peak,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved() if on_gpu else None,
                "working_bytes": peak - before if peak is not None else None,
                "estimated_working_bytes": estimated,
                "calibrated_working_bytes": decode_working_bytes(estimated, on_gpu),
            }
            if variant == "eager":
                eager[width] = (seconds, images[0])
            elif width in eager:
                seen, pictures = eager[width]
                row["eager_ms_per_image"] = round(1e3 * seen / args.images, 2)
                row["max_abs_difference"] = float((images[0] - pictures).abs().max())
            print(json.dumps(row), flush=True)


def estimated_decode(arch: str, resolution: int, fp16: bool) -> Callable[[int, bool], int]:
    """The memory estimate's working peak of decoding ``width`` images at once, in the
    VAE's own dtype or not: ``arch``'s shapes (any preset: only the resolution and the
    precision matter to a decode)."""
    config = load_preset("incompressibility")
    config.sample.resolution = resolution
    config.model.mixed_precision = "fp16" if fp16 else "no"
    run = meta_run(config, arch)
    return lambda width, own_dtype: run.decode(tiling=False, batch=width, own_dtype=own_dtype)


if __name__ == "__main__":
    main()
