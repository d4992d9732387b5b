"""How long an epoch of given settings takes: the model `--vram` ranks settings with.

Measured on an H100 (``../shared/measurements/h100-2026-11-25``, SD 1.5 UNet at 512 px,
eager, fp16 base with an fp32 LoRA under autocast), a UNet call costs the larger of two
times: the host's time to launch its kernels, which does not depend on the batch (a
training forward+backward: 164-170 ms with 2 latents, 178-193 ms with 8), and the GPU's
time to do the arithmetic, which grows with it (an fp16 forward of 16 latents: 52 ms,
12.9 TFLOP, an effective 245 TFLOP/s while matmuls alone ran at ~800). So on a fast GPU
a bigger micro-batch is almost free and gradient checkpointing at micro-batch 4 beats
micro-batch 1 without it; on a slow one arithmetic dominates and checkpointing's extra
forward costs ~45% of the training time.

Both times are scaled to the run: the host's by the UNet's module count against SD
1.5's (kernel launches follow modules; an assumption until measured), the GPU's by the
FLOPs counted for the run's model and resolution (``speed.flops``) and the card's rate:
its listed dense fp16 rate (``speed.devices``), else its fp16 matmul rate measured when
the fit runs (a second), each scaled by the share of it the UNet with LoRA reached on the
H100. A micro-step's calls without gradients (NFT's old policy, the KL guard's base model)
add a guided forward each. Each image's decode adds the VAE's counted FLOPs (SD 1.5 at
512 px: 2.5 TFLOP, 3% of a 50-step guided rollout but 39% of an 8-step LCM's; tiling
counted as tiled) at a share of the UNet's rate, and each decode call a fixed cost, both
measured per kind of decode (``DECODE_RATE_SHARE``, ``DECODE_CALL_SECONDS``). An fp8
base (``memory.quantize=fp8``) adds its dequantisation to each pass: host time
(``FP8_MODULES_PER_LAYER``) and memory traffic (``FP8_DEQUANTISE_BYTES``, at a bandwidth
assumed), neither timed on a GPU. bitsandbytes'
nf4/int8 dequantisation is not modelled: the one nf4 row (H100, 2026-11-25, micro-batch 1,
launch-bound; ``../shared/measurements/h100-2026-11-25/`` rows ``sd15-nf4`` in gpu2.jsonl
and ``sd15`` in gpu1.jsonl) took 0.69 and 11.51 s per image of sampling and training
against the 16-bit base's 0.82 and 12.36 with the same offloading, in another call of a
machine whose rows varied by 20%: no cost told apart from that noise; at
arithmetic-bound batches it is not measured, and the fit only ranks settings of one base
against each other. Encoding and
the reward are not modelled apart: the loop overheads cover them and the trainer's own
time, as measured.

With a CUDA-graph mode of ``speed.compile`` a graphed call (training; sampling too with
``speed.graph_sampling``) replays without the host's launches, but its thousands of
kernels still take the GPU a floor of time each: ``GRAPHED_CALL_FLOOR`` of the eager
call's launch time, the larger of that and the arithmetic. Measured on an H200
(2026-11-26, SD 1.5, micro-batch 4, ``cudagraphs``): 1.207 s of training per image, the
model 1.21 (arithmetic-bound); the floor comes from the RLCM preset's training on an H100
(2 latents per call), and is taken for graphed sampling calls too (not measured apart).
How a call's time moves from the floor to the arithmetic as its batch grows is not
measured (``benchmarks/unet_profile.py --sweep`` times it): the model takes the larger.

Inductor's modes (``speed.compile`` default, reduce-overhead, max-autotune) fuse the
UNet's kernels: its arithmetic runs faster (``INDUCTOR_RATE_GAIN``, per call kind) and,
without CUDA graphs, the host launches less (``INDUCTOR_HOST_SHARE``). Both come from one
H100 row (2026-11-26, micro-batch 8 with checkpointing, offloaded, ``default``), whose
calls were bound by arithmetic: the host's share is an upper bound, not a measure.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lowvram_ddpo.algorithms.steps import no_grad_calls_per_micro_step
from lowvram_ddpo.config import INDUCTOR_MODES, Config, SpeedConfig
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.estimate import meta_run, readable_shape
from lowvram_ddpo.processes import world_size
from lowvram_ddpo.speed.compile import CALL_KINDS, graphs_replay
from lowvram_ddpo.speed.devices import KNOWN_RATES, dense_fp16_tflops, named_card
from lowvram_ddpo.speed.flops import EpochFlops

# The H100 calibration (SD 1.5 UNet at 512 px, LoRA rank 4 under fp16 autocast).
HOST_SECONDS_SAMPLING_CALL = 0.068
"""A LoRA forward without gradients, 2 latents (76 ms with 16)."""
HOST_SECONDS_TRAINING_CALL = 0.167
"""A LoRA forward + backward, 2 latents (164-170 ms; 178-193 with 8)."""
HOST_SECONDS_CHECKPOINTED_CALL = 0.286
"""The same with gradient checkpointing (286 ms with 2 latents, 288 with 8)."""
SD15_UNET_MODULES = 1254
"""Leaf modules of the SD 1.5 UNet with LoRA rank 4 on attention (``leaf_modules``; SDXL
has 4659): the host times' scale."""
SAMPLING_LOOP_OVERHEAD = 0.97
TRAINING_LOOP_OVERHEAD = 1.2
"""The trainer's measured phase time over its UNet calls' predicted time, with the host
waits out of the loops (H200, 2026-11-26, `bench speed`, SD 1.5): sampling 0.99 (8
images, nothing offloaded), 1.00 (the same with CUDA graphs); training 1.09 (micro-batch
4), 1.28 (8, checkpointing), 1.20 (4, CUDA graphs). Before the waits were taken out
(H100, 2026-11-25) training was 1.25-1.33. The sampling ratios counted the decode in the
loop; it is predicted apart now (3% of those rows' arithmetic), hence 0.97."""
OFFLOAD_SAMPLING_COST = 1.12
"""Sampling with the text encoder and VAE offloaded (moved in and out per batch) over
sampling with them on the card: 0.532 against 0.469 s per image (H200, 2026-11-26, 8
images per batch, SD 1.5): what `--vram` weighs against their memory. Measured when the
VAE went back to the host by a copy out; a visit now copies it in only (``offload``):
kept until measured again, so the fit may keep modules on the card that it could offload."""
GRAPHED_CALL_FLOOR = 0.31
"""A graphed UNet call's least time over the eager call's launch time (the host times
above). The RLCM preset on an H100 (2026-11-26, ``cudagraphs``, LCM-shaped SD 1.5 UNet,
training 2 unguided latents per call): 0.249 s of training per image = 62 ms per micro-step,
52 ms without the loop's 1.2, where its arithmetic needs 20: 0.31 of the eager training
call's 167 ms. The H200's graphed micro-batch 4 (80 ms of arithmetic per call) is above
it, as measured. Both ran torch's ``cudagraphs`` backend, whose replays first copied every
weight of the UNet into the graphs' pool (on the H100: ~1,400 more kernels per training
call than eager, 9.3 ms of them; ``speed/cudagraphs_backend.py`` reads the weights in
place since 2026-11-27): the floor is likely lower now, unmeasured (``gpu_session.sh
graphs``)."""
FP8_MODULES_PER_LAYER = 1.0
"""The host's cost of one fp8 layer's dequantisation (``memory.quantize=fp8``: an autograd
Function, a cast and a multiply per pass) in leaf modules' host time: assumed, not timed.
For scale, counted on the CPU (``benchmarks/cudagraphs_cpu_check.py ops``, SD 1.5's
layout, 277 of 1,253 leaf modules converted, 2026-11-26): a forward's computing aten ops
1,559 -> 2,113 (2.0 per layer against 1.24 per module), a forward and backward's 3,495 ->
4,530 (3.7 against 2.79). A module's host time (~54 us in the H100's sampling call) is
mostly Python, not launches (~5 us each), so ops alone would overstate it."""
FP8_DEQUANTISE_BYTES = 7
"""Bytes each fp8 weight moves per dequantisation: 1 read and 2 written by the cast, 2
read and 2 written by the scale's multiply."""
H100_MEMORY_TBPS = 3.35
"""The H100 SXM's listed memory bandwidth. Other cards' is taken in proportion to their
UNet rate, as on the H100 (an assumption: most consumer cards have more bandwidth per
FLOP, so their dequantisation is predicted slower than it is)."""
DECODE_RATE_SHARE = {"autocast": 0.81, "half": 1.0, "compiled": 1.88}
"""The VAE decode's arithmetic rate over the UNet's (``Gpu.unet_tflops``), per kind of
decode: under autocast (the default), in the VAE's own half precision
(``speed.half_decode``), compiled by Inductor (``speed.compile_decoder``). Fitted with
``DECODE_CALL_SECONDS`` to the decode alone on an H200 (2026-11-27, SD 1.5 at 512 px,
fp16, `benchmarks/decode_batch.py`; 2.51 TFLOP an image): under autocast 27.1, 24.2,
21.0 and 19.5 ms an image at 1, 2, 4 and 8 images per call, half 23.2, 20.6, 17.6 and
16.0, compiled 10.1 and 9.0 at 2 and 4; the fit within 7% of each. Autocast's float32
norms and layout copies make the eager decode slower than the UNet's arithmetic; fused,
it runs faster. An fp32 decode (SDXL's upcast VAE) is taken as autocast's: not measured."""
DECODE_CALL_SECONDS = {"autocast": 0.0104, "half": 0.0101, "compiled": 0.0044}
"""What each decode call costs besides its images' arithmetic (the same fit): launches
and small-batch kernels, so fewer, wider calls (``memory.decode_batch``) decode faster."""
INDUCTOR_RATE_GAIN = {"sampling": 1.51, "training": 1.81}
"""The UNet's arithmetic rate compiled by Inductor over eager's, per call kind. On an H100
(2026-11-26, SD 1.5 at 512 px, ``bench speed`` with ``speed.compile=default``, micro-batch
8 with checkpointing, text encoder and VAE offloaded): 0.350 s of sampling and 0.982 of
training per image against eager's 0.535 and 1.924 at the same settings (another call the
same day). Through this model's loop overheads that is ~257 TFLOP/s sampling (16 latents
per call) and ~308 training (8 images, checkpointing's second forward counted) against
eager's 170: fused elementwise kernels and norms make fewer passes over memory, and the
training graph's backward fuses more. One row, one card: a slower card's gain is
assumed the same."""
BLOCKS_GAIN_SHARE = {"sampling": 0.945, "training": 0.857}
"""What is left of Inductor's gain when it compiles by blocks (``speed.compile_scope``):
the whole UNet's time per image over the blocks' on an H100 (2026-11-27, SD 1.5 fitted
to 7 GB, one call after the other on one machine): sampling 0.329 against 0.348 s,
training 0.944 against 1.102 (the layers between blocks eager, each block a call). The
host's share of a call is taken as the whole UNet's (unmeasured: more launches between
blocks, so a host-bound call, micro-batch 1, is likely slower than predicted)."""
INDUCTOR_HOST_SHARE = 0.46
"""An Inductor-compiled call's host time over the eager call's (``HOST_SECONDS_...``):
fewer, fused kernels launched from generated code instead of a module tree. An upper
bound: the H100 row's checkpointed training call took 131 ms in all (its 0.982 s per
image over the 1.2 loop overhead), 0.46 of the eager call's 286 ms of launches, and its
arithmetic needed about as long; a host time not yet measured alone (``unet_profile.py
--sweep`` at micro-batch 1 would)."""
H100_DENSE_TFLOPS = 989.4
H100_UNET_TFLOPS = 170.0
"""The UNet's arithmetic rate once the GPU is the bottleneck: on the H100 a forward of 16
latents with the LoRA under autocast, 12.9 TFLOP in 76 ms (52.4 ms without the LoRA); the
H200's training with CUDA graphs agrees (1.207 s per image against 1.21 predicted). 17% of
the card's listed dense fp16 rate; 0.21 of the ~800 TFLOP/s its fp16 matmuls reached."""
UNET_SHARE_OF_LISTED = H100_UNET_TFLOPS / H100_DENSE_TFLOPS
UNET_SHARE_OF_MATMUL = H100_UNET_TFLOPS / 800.0


@dataclass(frozen=True)
class Gpu:
    name: str
    unet_tflops: float
    """The UNet's arithmetic rate on this card, TFLOP/s."""

    @classmethod
    def listed(cls, name: str, dense_tflops: float) -> Gpu:
        return cls(name, dense_tflops * UNET_SHARE_OF_LISTED)


def matmul_tflops(size: int = 4096, repeats: int = 20) -> float:
    """This CUDA card's fp16 matmul rate, measured in about a second."""
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    b = torch.randn(size, size, device="cuda", dtype=torch.float16)
    a @ b  # warm-up: cuBLAS picks its kernel
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


_assumed: list[Gpu] = []
"""The card ``assume_card`` names, while it is in force."""


def card_for_prediction(query: str) -> Gpu:
    """The listed card ``query`` names (``bench memory --card``), at its listed rate; a
    one-line error for one not listed."""
    found = named_card(query)
    if found is None:
        examples = ", ".join(name for name in KNOWN_RATES if name.startswith("RTX 40"))
        raise UserError(
            f"--card {query!r}: not a card in the rate table (laptop GPUs are not: their "
            f"clocks follow the laptop's power limit). Name a listed one, e.g. {examples}, "
            "H100, A100"
        )
    name, rate = found
    article = "a" if name[0] in "BCDGJKPQTUVWYZ" else "an"  # "an RTX", "an H100", "a T4"
    return Gpu.listed(f"{article} {name} (--card: its listed rate)", rate)


@contextmanager
def assume_card(gpu: Gpu | None) -> Iterator[None]:
    """Within it, ``this_gpu`` is ``gpu`` (None: this machine's): the time model ranks and
    predicts for a card the user names, not the one present."""
    _assumed[:] = [gpu] if gpu is not None else []
    try:
        yield
    finally:
        _assumed.clear()


def this_gpu() -> Gpu:
    """The card the time model predicts for: the one ``assume_card`` names, else this
    machine's (``detected_gpu``)."""
    return _assumed[0] if _assumed else detected_gpu()


@functools.cache
def detected_gpu() -> Gpu:
    """The CUDA card: its listed rate, or its matmul rate measured once per process for a
    card not in the table; without CUDA an H100 (the calibrated card), named as assumed."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        rate = dense_fp16_tflops(name)
        if rate is not None:
            return Gpu.listed(name, rate)
        if world_size() > 1:  # every process must rank alike
            return Gpu(
                f"{name} (an H100's rate assumed: not measured in a multi-GPU run)",
                H100_UNET_TFLOPS,
            )
        measured = matmul_tflops()
        return Gpu(
            f"{name} (fp16 matmul {measured:.0f} TFLOP/s, measured)",
            measured * UNET_SHARE_OF_MATMUL,
        )
    return Gpu("an H100 (assumed: no GPU here)", H100_UNET_TFLOPS)


@dataclass(frozen=True)
class EpochTime:
    sampling: float
    training: float

    @property
    def total(self) -> float:
        return self.sampling + self.training


def leaf_modules(unet: torch.nn.Module) -> int:
    return sum(1 for m in unet.modules() if not any(True for _ in m.children()))


def predict_epoch(
    config: Config, flops: EpochFlops, gpu: Gpu, unet_modules: int = SD15_UNET_MODULES
) -> EpochTime:
    """Seconds of the UNet's work in one epoch of ``config`` on ``gpu``."""
    s, t, m = config.sample, config.train, config.memory
    fp8 = flops.fp8_layers if m.quantize == "fp8" else 0
    launches = (unet_modules + fp8 * FP8_MODULES_PER_LAYER) / SD15_UNET_MODULES  # kernels
    host = {c: launches * host_share(config.speed, c) for c in CALL_KINDS}
    rates = {c: gpu.unet_tflops * 1e12 * rate_gain(config.speed, c) for c in CALL_KINDS}
    rate = gpu.unet_tflops * 1e12  # the dequantisation's: never compiled
    samples = s.batch_size * s.batches_per_epoch
    steps = flops.trained_steps

    # an fp8 base's weights dequantised per pass: memory traffic, whatever the batch
    bandwidth = rate * H100_MEMORY_TBPS / H100_UNET_TFLOPS
    dequantise = FP8_DEQUANTISE_BYTES * flops.fp8_weights / bandwidth if fp8 else 0.0
    step_flops = flops.sampling_per_image / s.num_steps * s.batch_size
    sampling_call = max(
        HOST_SECONDS_SAMPLING_CALL * host["sampling"], step_flops / rates["sampling"] + dequantise
    )
    decoding = decode_seconds(config, flops, gpu)
    sampling = (
        s.batches_per_epoch * s.num_steps * sampling_call + decoding
    ) * SAMPLING_LOOP_OVERHEAD
    if m.offload:
        sampling *= OFFLOAD_SAMPLING_COST

    per_image_step = flops.training_per_image / (steps * t.inner_epochs)
    guided_forward = flops.sampling_per_image / s.num_steps  # of one image at one step
    # the checkpointed part of the forward runs again inside the backward: its arithmetic,
    # its launches, its weights (dequantised again)
    _, relaunched, reread = (
        flops.recomputation.left(m.uncheckpointed_levels)
        if m.gradient_checkpointing
        else (0.0, 0.0, 0.0)
    )
    per_image_step += flops.recomputed_per_step(m, s.num_steps)
    extra = no_grad_calls_per_micro_step(t.algorithm, t.kl_coef)  # NFT, the KL guard
    unguided = t.algorithm == "nft" and s.guidance_scale != 1.0  # NFT's calls: CFG-free
    uncounted = max(extra - flops.calls_without_gradients, 0)  # counted: in the trained step
    per_image_step += uncounted * (guided_forward / 2 if unguided else guided_forward)
    checkpointing_launches = relaunched * (
        HOST_SECONDS_CHECKPOINTED_CALL - HOST_SECONDS_TRAINING_CALL
    )
    floor = HOST_SECONDS_TRAINING_CALL + checkpointing_launches + extra * HOST_SECONDS_SAMPLING_CALL
    passes = 2 + reread + extra  # each dequantises the weights again
    training_call = max(
        floor * host["training"],
        per_image_step * t.batch_size / rates["training"] + passes * dequantise,
    )
    micro_batches = -(-samples // t.batch_size)
    training = micro_batches * steps * t.inner_epochs * training_call * TRAINING_LOOP_OVERHEAD
    return EpochTime(sampling, training)


def decode_kind(config: Config) -> str:
    """How the run decodes: compiled (``speed.compile_decoder``; a tiled decode compiles
    nothing), in the VAE's half precision (``speed.half_decode``), else under autocast."""
    if config.speed.compile_decoder and not config.memory.vae_tiling:
        return "compiled"
    return "half" if config.speed.half_decode else "autocast"


def decode_seconds(config: Config, flops: EpochFlops, gpu: Gpu) -> float:
    """Seconds of an epoch's VAE decodes: ``memory.decode_batch`` images per call (at most
    a sampling batch), each call's fixed cost and each image's arithmetic."""
    s, kind = config.sample, decode_kind(config)
    calls = s.batches_per_epoch * -(-s.batch_size // min(config.memory.decode_batch, s.batch_size))
    rate = gpu.unet_tflops * 1e12 * DECODE_RATE_SHARE[kind]
    images = s.batch_size * s.batches_per_epoch
    return (
        calls * DECODE_CALL_SECONDS[kind] + images * flops.decode(config.memory.vae_tiling) / rate
    )


def compiles_with_inductor(speed: SpeedConfig) -> bool:
    """Whether the trainer's UNet calls run Inductor's fused kernels: sampling and training
    alike under its modes (``sampling_calls`` leaves sampling eager under ``cudagraphs``
    only)."""
    return speed.compile in INDUCTOR_MODES


def host_share(speed: SpeedConfig, call: str) -> float:
    """A ``call``'s host time under ``speed`` over the eager call's: CUDA graphs replay
    without launches down to their floor; Inductor launches fewer, fused kernels."""
    if graphs_replay(speed, call):
        return GRAPHED_CALL_FLOOR
    return INDUCTOR_HOST_SHARE if compiles_with_inductor(speed) else 1.0


def rate_gain(speed: SpeedConfig, call: str) -> float:
    """How much faster the UNet's arithmetic runs in ``call`` under ``speed`` than eager."""
    if not compiles_with_inductor(speed):
        return 1.0
    by_blocks = BLOCKS_GAIN_SHARE[call] if speed.compile_scope == "blocks" else 1.0
    return INDUCTOR_RATE_GAIN[call] * by_blocks


def predicted_here(config: Config, arch: str, flops: EpochFlops) -> tuple[EpochTime, Gpu]:
    """The time model's epoch of ``config`` on this machine's card (``this_gpu``)."""
    gpu = this_gpu()
    unet_modules = leaf_modules(meta_run(config, arch).parts.unet)
    return predict_epoch(config, flops, gpu, unet_modules), gpu


def check_line(config: Config, seconds: dict[str, float]) -> str:
    """A run's warmed epoch (``seconds_sampling``, ``seconds_training``) beside what the time
    model predicts for it on this card: where they part, ``--vram``'s ranking may not hold
    here ("" when the model's shape cannot be read)."""
    from lowvram_ddpo.speed.flops import epoch_flops

    try:  # a diagnostic: never the end of a run
        arch, _ = readable_shape(config, config.model.name)
        epoch, gpu = predicted_here(config, arch, epoch_flops(config, arch, count_backward=False))
        pairs = {"sampling": epoch.sampling, "training": epoch.training}
        parts = [
            f"{phase} {seconds[f'seconds_{phase}']:.1f} s against {predicted:.1f} predicted "
            f"({seconds[f'seconds_{phase}'] / predicted:.2f})"
            for phase, predicted in pairs.items()
        ]
    except Exception:  # noqa: BLE001
        return ""
    return (
        f"time model check on {gpu.name}: {'; '.join(parts)}. Far from 1, `--vram` may not "
        "pick the fastest settings on this card: please report the line"
    )
