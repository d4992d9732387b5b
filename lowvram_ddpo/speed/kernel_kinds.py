"""Which kind of work a profiled kernel (or, on a CPU, an operator) does, from its name:
what a GPU session's profile groups by (``bench speed --profile``,
``benchmarks/unet_profile.py``) to see where a UNet's time goes.

Inductor's own kernels are named for what they fuse (``triton_poi_fused_add_silu_3``:
pointwise, ``triton_red_``/``triton_per_``: reductions, such as a GroupNorm with what
follows it), so they get kinds of their own before the names inside them are read; its
templates (``triton_tem_fused_mm``, ``..._convolution``) fall to matmul or convolution.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

KINDS = (  # the first pattern a kernel's name matches names its kind
    ("fused pointwise (Inductor)", r"^triton_poi_"),
    ("fused reduction (Inductor: norms)", r"^triton_(red|per)_"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    # cuDNN turning an NCHW tensor into the NHWC its kernels want, and back: 6% of an
    # Inductor epoch's kernel time on an H100 (2026-11-27), one pair per convolution
    ("layout change (NCHW<->NHWC)", r"nchwtonhwc|nhwctonchw"),
    ("convolution", r"conv|implicit_gemm|cudnn|winograd|nchw|nhwc"),
    # cuBLAS 12.8+ names its Hopper GEMMs nvjet_*
    ("matmul", r"gemm|gemv|splitk|nvjet|cutlass|sm\d+_xmma|matmul|addmm|\bmm\b|linear"),
    ("normalisation", r"norm|welford|rowwisemoments"),
    ("copy and cast", r"copy|cast|to_copy|transpose|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce"),
)


def kernel_times(events: Iterable, on_device: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of each profiled event that did work: on a GPU the device's
    kernels alone, since an operator's row repeats the time of the kernels it launched
    (summing both counted an H100 epoch's 9.6 s of kernels as 19.2, 2026-11-27); on a CPU
    each operator's self time (which leaves out its children's)."""
    timed = []
    for event in events:
        if on_device and event.device_type.name != "CUDA":
            continue
        us = event.self_device_time_total if on_device else event.self_cpu_time_total
        if us > 0:
            timed.append((event.name, us))
    return timed


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def milliseconds_by_kind(timed: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(kernel name, microseconds) pairs summed into milliseconds per kind, largest first."""
    by_kind: Counter[str] = Counter()
    for name, us in timed:
        by_kind[kind_of(name)] += us / 1000
    return {kind: round(ms, 2) for kind, ms in by_kind.most_common()}
