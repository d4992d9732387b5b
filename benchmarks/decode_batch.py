"""What decoding several images per VAE call saves (``memory.decode_batch``).

    python benchmarks/decode_batch.py --arch sd15                 # on a GPU machine
    python benchmarks/decode_batch.py --arch pocket --repeats 1   # CPU smoke run

Builds the architecture's random-weight VAE (fp16 on a GPU, fp32 on a CPU) and decodes
``--images`` latents at the model's resolution through ``rollout.decode_latents`` (the
trainer's decode) at each width of ``--widths``, timing the median of ``--repeats`` (after
one warm-up: cuDNN's choices) with the peak memory allocated on a GPU. Prints a JSON line
per width: milliseconds per image, the speed-up over one image per call and the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from lowvram_ddpo.architectures import native_resolution, random_pipeline
from lowvram_ddpo.rollout import decode_latents, latent_shape


def median_seconds(decode: Callable[[], object], repeats: int) -> float:
    decode()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode()  # ends with a copy to the host: the GPU's work is done
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--widths", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    pipe = random_pipeline(args.arch, torch.float16 if on_gpu else torch.float32, device)
    shape = latent_shape(pipe.unet, pipe.vae, native_resolution(args.arch))
    latents = torch.randn(args.images, *shape, device=device)
    one = None
    for width in (int(w) for w in args.widths.split(",")):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(
            lambda width=width: decode_latents(pipe.vae, latents, batch_size=width), args.repeats
        )
        one = one or seconds
        print(
            json.dumps({
                "arch": args.arch,
                "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                "decode_batch": width,
                "ms_per_image": round(1e3 * seconds / args.images, 2),
                "speed_up": round(one / seconds, 3),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
            }),
            flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
