"""What an offloaded module's visit to the GPU costs: the old round trip against ours.

    python benchmarks/offload_visit.py --arch sd15            # on a GPU machine
    python benchmarks/offload_visit.py --arch pocket --repeats 2   # CPU smoke run

With ``memory.offload`` the VAE visits the GPU once per sampling batch (the text encoder
when new prompts come, a reward network once per scored batch). Builds the architecture's
random-weight VAE and text encoder in fp16 (fp32 on a CPU) and times, per module, the
median of ``--repeats`` visits, each ended by a synchronise after a small kernel that reads
every weight (the decode waits for the copy in the same way):

- ``round trip``: ``module.to(device)`` then ``module.to("cpu")`` (the offloader before
  2026-11-26: each copy out a wait on the GPU into fresh host memory);
- ``copy in``: ``offload.Offloader``'s visit (frozen weights kept pinned on the host,
  copied in asynchronously, nothing copied out).

Prints one JSON line per module: megabytes, milliseconds per visit each way and their
ratio. Numbers only mean something on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from lowvram_ddpo.architectures import random_pipeline
from lowvram_ddpo.memory.units import module_bytes
from lowvram_ddpo.offload import Offloader
from lowvram_ddpo.text_encoding import text_encoders


def touch_every_weight(module: torch.nn.Module) -> None:
    """A kernel per tensor that needs its copy to have arrived, then a wait for the GPU."""
    for tensor in (*module.parameters(), *module.buffers()):
        tensor.view(-1)[:1].float().sum()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(visit: Callable[[], None], repeats: int) -> float:
    visit()  # warm-up: the caching allocator's first blocks
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        visit()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def round_trip(module: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    def visit() -> None:
        module.to(device)
        touch_every_weight(module)
        module.to("cpu")

    return visit


def copy_in(offloader: Offloader, name: str) -> Callable[[], None]:
    def visit() -> None:
        with offloader.loaded(name) as module:
            touch_every_weight(module)

    return visit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    pipe = random_pipeline(args.arch, torch.float16 if on_gpu else torch.float32)
    modules = {"vae": pipe.vae, "text_encoder": text_encoders(pipe)}
    for name, module in modules.items():
        module.requires_grad_(False).eval()
        old = median_ms(round_trip(module, device), args.repeats)
        offloader = Offloader(device, enabled=True)
        offloader.register(name, module)
        new = median_ms(copy_in(offloader, name), args.repeats)
        row = {
            "module": name,
            "arch": args.arch,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "megabytes": round(module_bytes(module) / 2**20, 1),
            "pinned": offloader.pinned_bytes > 0,
            "ms_round_trip": round(old, 2),
            "ms_copy_in": round(new, 2),
            "speed_up": round(old / new, 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
