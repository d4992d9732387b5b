"""``speed.compile_decoder``: the VAE's decoder compiled by Inductor, for the run's decode.

Each sampling batch ends with the VAE decoding its images. At 512 px SD's decoder works on
maps of 64x64 to 512x512 pixels with 128-512 channels, and under autocast each of its
GroupNorms runs in float32 with a cast up before and down after it (CUDA autocast's op
lists): memory traffic that Inductor fuses away (norm, SiLU and casts in one kernel).
Measured on an H200 (2026-11-27, SD 1.5's VAE at 512 px): 2.4-2.7x faster, 0.36 of eager's
working memory, an 18 s compile. The decode is ~1% of a 50-step DDPO epoch and a larger
share of RLCM's 8 steps (the time model's decode term: ~10% of its epoch on an H100),
hence on in the RLCM presets only. ``bench speed`` reports the decode's seconds apart
(its "decoding" line), so a GPU row with and without the setting measures it.

Only the run's own decode compiles: ``memory.decode_batch`` images (at most a sampling
batch) at the run's resolution (``DecodeShape``). Any other shape runs eagerly: a narrower
decode after running out of memory, tiles, a last short chunk, grids of one image. Each
would cost a compile of its own (18 s on an H200 for SD 1.5's VAE at 512 px) for a call
made rarely, and the narrowing ones come at a moment short of
memory.

Exactness: the decode is not part of a log-probability, so DDPO's replay is untouched.
Images may differ from eager ones by a rounding (Inductor keeps a fused chain's
intermediates in float32; no eager roundings asked, unlike ``compile_unet``), and rewards
with them: measured on the CPU in float32 (``tests/test_compile_decoder.py``) within
1e-5 of eager's pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._inductor import list_mode_options

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import vae_scale
from lowvram_ddpo.speed.compile import (
    CAN_RUN_EAGERLY,
    eager_if_compiling_fails,
    inductor_missing,
    say_what_compiles,
)
from lowvram_ddpo.speed.compile_cache import compile_cache_dir, use_compile_cache

SETTING = "speed.compile_decoder"


def check_decoder_compiler(wanted: bool, device: torch.device) -> None:
    """One line, before anything loads, when ``speed.compile_decoder`` cannot compile for
    ``device`` (Inductor: Triton on a GPU, a C++ compiler on a CPU)."""
    if wanted and (missing := inductor_missing(device)):
        raise UserError(f"{SETTING} needs {missing}; or set {SETTING}=false")


@dataclass(frozen=True)
class DecodeShape:
    """The decoder input that compiles: ``images`` latents of ``side`` x ``side``."""

    images: int
    side: int

    @classmethod
    def of_run(
        cls, vae: torch.nn.Module, decode_batch: int, sampling_batch: int, resolution: int
    ) -> DecodeShape:
        """The run's decode: ``decode_batch`` images per call (none more than a sampling
        batch holds) at ``resolution`` pixels, which the decoder sees ``vae_scale``
        times smaller."""
        return cls(min(decode_batch, sampling_batch), resolution // vae_scale(vae))

    def holds(self, sample: Tensor) -> bool:
        """Whether ``sample`` (latents [N, C, h, w]) is of this shape; any channels, dtype."""
        if sample.dim() != 4:
            return False
        images, _, height, width = sample.shape
        return (images, height, width) == (self.images, self.side, self.side)


def compile_decoder(
    vae: torch.nn.Module,
    device: torch.device,
    shape: DecodeShape,
    say: Callable[[str], None] = print,
    backend: str = "inductor",
) -> str:
    """Compile ``vae``'s decoder in place for ``shape`` (other shapes run eagerly); returns
    the line for the log. A compile that fails leaves the decoder eager, with one line
    (``eager_if_compiling_fails``); each compile says how long it took. ``backend``
    replaces Inductor in tests."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        return f"{SETTING}: this VAE has no decoder module to compile; it decodes eagerly"
    if decodes_in_tiles(vae, shape):
        return (
            f"{SETTING}: this run decodes in tiles (memory.vae_tiling), which decode "
            "eagerly: nothing compiled"
        )
    check_decoder_compiler(True, device)
    use_compile_cache()
    options = dict(list_mode_options("default")) if backend == "inductor" else None
    decoder.compile(backend=backend, options=options, dynamic=False)
    eager_if_compiling_fails([decoder], SAID_AS, "the VAE's decoder", f"{SETTING}=false", say)
    say_what_compiles(decoder, SAID_AS, say, lambda: "the VAE's decoder", "the decoder's calls")
    compiled_for_one_shape(decoder, shape)
    images = f"{shape.images} image{'s' * (shape.images > 1)}"
    return (
        f"{SETTING}: the VAE's decoder compiles at the first decode of {images} (once: "
        f"cached in {compile_cache_dir()}); other decodes run eagerly"
    )


def decodes_in_tiles(vae: torch.nn.Module, shape: DecodeShape) -> bool:
    """Whether diffusers' VAE decodes latents of ``shape`` in tiles (its rule: tiling on
    and the latent wider than a tile)."""
    tile = getattr(vae, "tile_latent_min_size", shape.side)
    return bool(getattr(vae, "use_tiling", False)) and shape.side > tile


SAID_AS = f"{SETTING}=true"
"""How the decoder's compile lines start."""


def compiled_for_one_shape(decoder: torch.nn.Module, shape: DecodeShape) -> None:
    """Calls of ``shape`` go to the compiled decoder, whatever the UNet's stance (a run
    whose sampling call runs eagerly under ``speed.compile=cudagraphs`` still decodes
    compiled); any other shape to the eager one."""
    compiled: Callable[..., Tensor] = decoder._compiled_call_impl

    def call(sample: Tensor, *args: object, **kwargs: object) -> Tensor:
        if not shape.holds(sample):
            return decoder._call_impl(sample, *args, **kwargs)
        with compiled_stance():
            return compiled(sample, *args, **kwargs)

    decoder._compiled_call_impl = call


def compiled_stance() -> AbstractContextManager:
    """Compiled code runs inside, also where ``uncompiled_calls`` made the UNet eager."""
    return torch.compiler.set_stance("default") if CAN_RUN_EAGERLY else contextlib.nullcontext()
