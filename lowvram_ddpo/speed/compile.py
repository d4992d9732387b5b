"""``speed.compile``: ``torch.compile`` of the UNet, in place.

Every UNet call of an eager run is bound by the host launching hundreds of small kernels
(measured on an H100: a LoRA forward+backward at micro-batch 1 took 164 ms where the
GPU's arithmetic needs ~4 ms). Inductor fuses those kernels (default mode: 164 -> 118 ms
per training micro-step, 171 s to compile, on the H100); ``reduce-overhead`` also
replays them as CUDA graphs. The cost is compile time at the first call of each shape
(sampling, training, grid), so it pays on long runs only, and it is off by default until
its fp16 replay error is measured on a GPU (the DDPO clip range is 1e-4).

``nn.Module.compile`` compiles in place: parameter names, LoRA export and checkpoints
are the same as without it. Compiled code is cached on disk between runs
(``TORCHINDUCTOR_CACHE_DIR``, by default under the user's cache folder), so a resumed or
repeated run skips most of the compile time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lowvram_ddpo.config import COMPILE_MODES
from lowvram_ddpo.errors import UserError


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept: ``TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``$XDG_CACHE_HOME/lowvram-ddpo/torch-compile`` (``~/.cache/...``), which survives
    a reboot, unlike PyTorch's default under /tmp."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lowvram-ddpo" / "torch-compile"


def check_compiler(device: torch.device) -> None:
    """Inductor needs Triton to generate GPU kernels and a C++ compiler for CPU ones."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(
                "speed.compile needs Triton for GPU kernels: `pip install triton` (on Windows "
                "`pip install triton-windows`), or set speed.compile=off"
            )
    elif not any(shutil.which(c) for c in ("g++", "clang++", "c++", "cl")):
        raise UserError(
            "speed.compile needs a C++ compiler (g++ or clang) on a CPU-only machine, "
            "or set speed.compile=off"
        )


def compile_unet(
    unet: torch.nn.Module, mode: str, device: torch.device, backend: str = "inductor"
) -> str:
    """Compile ``unet`` in place with ``mode`` (one of ``COMPILE_MODES``); returns a line
    for the log ("" when off). ``backend`` other than inductor is for tests."""
    if mode == "off":
        return ""
    if mode not in COMPILE_MODES:
        raise UserError(f"speed.compile must be one of {', '.join(COMPILE_MODES)} (got {mode!r})")
    if backend == "inductor":
        check_compiler(device)
        cache = compile_cache_dir()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    # static shapes: each of the run's few shapes (sampling, training, grid) is compiled
    # once, specialised, instead of one slower dynamic-shape kernel for all of them
    unet.compile(
        backend=backend,
        mode=None if mode == "default" or backend != "inductor" else mode,
        dynamic=False,
    )
    return (
        f"torch.compile ({mode}): the first call of each shape compiles (minutes on a GPU, "
        f"less when cached in {compile_cache_dir()})"
    )
