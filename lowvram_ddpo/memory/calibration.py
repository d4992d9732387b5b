"""How the meta-device estimate of *allocated* bytes becomes what a card must have.

Calibrated on the first GPU measurements (one NVIDIA H100 80GB, 2026-11-25,
`benchmarks/gpu_checks.py` at commit 6cd3d5f; docs/benchmarks.md has the table):

- the estimate of allocated memory was within 1-5% of the measured allocated peak on
  every row but the nf4 one (a defect of the nf4 path, not of the estimate);
- with ``expandable_segments:True`` (what the command line sets, `memory/allocator.py`)
  the peak *reserved* was 1.086x (SDXL, 1024 px) and 1.104x (SD 1.5 with checkpointing)
  the estimated allocated peak; without it up to 1.73x (fragmentation);
- ``nvidia-smi`` showed 10.35 GB used while PyTorch had reserved 9.34 GiB (SDXL row, no
  expandable segments): ~1.0 GiB for the CUDA context, kernels and libraries outside the
  allocator (read as GiB, the larger reading). An H100 has many more SMs than a consumer
  card, whose context is likely smaller: not measured yet, so this errs on the safe side.
"""

from __future__ import annotations

from lowvram_ddpo.config import INDUCTOR_MODES, Config
from lowvram_ddpo.memory.allocator import expandable_segments_expected
from lowvram_ddpo.memory.units import GB

RESERVED_OVER_ALLOCATED = 1.11
"""Peak reserved / estimated allocated, with expandable segments: the largest measured
ratio (1.104), rounded up."""

RESERVED_OVER_ALLOCATED_PLAIN = 1.70
"""The same with PyTorch's default allocator (no expandable segments: Windows, or an
allocator setting of the user's without them): measured 1.40 (SDXL, 9.34 GiB reserved
for 6.68 allocated) and 1.68 (SD 1.5 with checkpointing, 4.61 for 2.74) on the H100,
2026-11-25; the larger, rounded up. A fit on such a machine leaves that room."""


def fragmentation_ratio() -> float:
    """Reserved over allocated for runs on this machine (``expandable_segments_expected``)."""
    expandable = expandable_segments_expected()
    return RESERVED_OVER_ALLOCATED if expandable else RESERVED_OVER_ALLOCATED_PLAIN


GRAPHS_LATER_EPOCH_GROWTH = int(1.4 * GB)
"""Under CUDA graphs the peak reserved rose from the first epoch to the second by 1.02
GiB (H200, SD 1.5 micro-batch 4, both calls graphed), 1.41 (H100, micro-batch 8, the
training call graphed) and 1.16 (H100, RLCM, both graphed), all 2026-11-26; the first
epochs' peaks were within 5% of the estimate without it. Cause not known yet (a second
recording of some graph? each epoch's recordings are counted since:
``speed.cuda_graphs.count_graph_events``, in ``bench speed``'s JSON), nor whether later
epochs grow further (``bench speed --epochs``): the largest rise (1.41) to one decimal is
added to every phase. A candidate cause found since (2026-11-27, without a GPU): all
three rows ran torch's ``cudagraphs`` backend, which copied every weight of the UNet into
the graphs' pool at each replay (SD 1.5's: 1.6 GiB); ours reads them in place
(``speed/cudagraphs_backend.py``). Kept until a GPU measures a graphed run without the
copy (``gpu_session.sh graphs``): where it was the cause, the estimate is now high by
about this much, the safe side. Not added under Inductor's graph modes
(``later_epoch_growth``): under ``reduce-overhead`` (``max-autotune`` assumed alike) SD
1.5 at micro-batch 4, nothing offloaded (H100, 2026-11-27) reserved 5.16-5.21 GiB beyond
what it allocated (the graphs' pool, inferred) from the start of the second epoch to the
fourth; the later epochs' peak, 0.89 GiB above the first's, was the decode's working
memory beside the pool, which the estimate counts."""


def later_epoch_growth(compile_mode: str) -> int:
    """What the estimate adds to a graphed run's reserved peak for its later epochs:
    ``GRAPHS_LATER_EPOCH_GROWTH`` for the ``cudagraphs`` backend, none for Inductor's graph
    modes (measured under ``reduce-overhead``), none without graphs."""
    return GRAPHS_LATER_EPOCH_GROWTH if compile_mode == "cudagraphs" else 0


DECODE_WORKING_GROWTH = 1.44
"""The VAE decode's working memory over the meta-device estimate's, inferred from one row:
SD 1.5 at 512 px, 4 images per decode call under fp16 autocast (H100, 2026-11-27, `bench
speed --vram 7GB`). The sampling phase, which then held the denoising and the decode
together, allocated 5.55 and 5.59 GiB at its peak in its two epochs; ~2.0 GiB were held
before the decode (the encode phase: 2.02 measured, 2.01 estimated) and the denoising
alone is estimated at 3.05, so the peak is taken as the decode's: 3.59 GiB of working
memory where the estimate counted 2.50 (its decode phase: 4.50 allocated). Likely the
copies cuDNN makes of the NCHW activations into its NHWC layout, which the meta device
does not see. The decode alone, measured since (H200, 2026-11-27,
`benchmarks/decode_batch.py`): 0.90, 1.77, 3.51 and 7.00 GiB of working memory at 1, 2,
4 and 8 images per call, where this factor gives 0.90, 1.80, 3.60 and 7.20. Applied to
every 16-bit decode, at any width: a decode one step narrower than fits costs a few
milliseconds an image, one wider than fits the run. Not to fp32 ones (SDXL's upcast VAE,
CPU runs): unmeasured, and cuDNN's layout for them is another question."""


COMPILED_DECODE_WORKING = 0.55
"""The decode's working memory with the VAE's decoder compiled by Inductor
(``speed.compile_decoder``) over the meta-device estimate (eager, under autocast):
measured 0.515 and 0.505 of it at 2 and 4 images per call (SD 1.5, 512 px, fp16
autocast: 0.64 and 1.26 GiB where eager took 1.80 and 3.51; H200, 2026-11-27,
`benchmarks/decode_batch.py --variants eager,half,compiled --widths 2,4`), rounded up.
Inductor fuses each GroupNorm with its casts and SiLU, so the float32 copies and the
cuDNN layout copies that ``DECODE_WORKING_GROWTH`` counts are never made."""

INDUCTOR_TRAINING_WORKING = 0.90
"""A training micro-step's working memory under Inductor's kernels (``speed.compile =
"default"``, the whole UNet one graph, no CUDA graphs) over the meta device's count, which
is eager's. Measured on SD 1.5 at 512 px, fp16, micro-batch 8 with checkpointing:
- the 8x8 level kept out, nothing offloaded: the training phase allocated 4.61-4.67 GiB
  at its peak in three runs on an H200 and 4.66 on an H100 (2026-11-27), 2.06 of them
  held before it: 2.55-2.61 GiB of working memory where the meta device counts 3.24
  (0.79-0.81); 5.20 GiB reserved on both cards (5.81 estimated without this factor,
  5.45 with it);
- every level checkpointed, offloaded: 4.73 GiB reserved on an H100 (2026-11-26, before
  each phase started on a released cache; allocated not recorded), 5.09 estimated
  without this factor, 4.76 with it: ~0.89 if it reserved 1.11x what it allocated.
The larger, rounded up. Eager, the same row reserved 4.99 GiB (5.09 estimated): the
meta count is eager's. Why Inductor holds less: its partitioner saves fewer tensors for
the backward pass (it recomputes cheap pointwise results, a norm's or an activation's
output, from a kept input). Not applied with ``memory.keep_attention`` (unmeasured
under Inductor), by blocks (``speed.compile_scope = "blocks"``: 4.95 GiB allocated on the
H100, 0.89 of the count: no margin) nor with checkpointing under the CUDA-graph modes
(unmeasured); without checkpointing, ``INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING``."""

INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING = 0.60
"""``INDUCTOR_TRAINING_WORKING`` without checkpointing, under any Inductor mode compiling
the whole UNet: measured 0.587 (SD 1.5, 512 px, fp16, micro-batch 4, nothing offloaded,
``speed.compile = "reduce-overhead"``, H100, 2026-11-27): the training phase allocated
7.10 GiB at its peak, 2.02 of them held before it, 5.08 GiB of working memory where the
meta device counts 8.66; rounded up. Why so much less than eager (inferred, not
measured): without checkpointing eager autograd keeps every intermediate its backward
reads, where Inductor's partitioner keeps fewer and recomputes the cheap ones (norms,
activations) from kept inputs. Measured in the first epoch, while cudagraph trees warmed
up and recorded (both allocate through the caching allocator). Applied beyond that row,
unmeasured: to ``default`` and ``max-autotune`` (the same partitioner, so the same saved
tensors expected), to other micro-batches (the 16 GB fit's 8), other models (SDXL, SD 3,
FLUX.2 with a user's ``speed.compile``). A compile that fails mid-run leaves the UNet
eager, which needs ~1.7x this (``compile.eager_if_compiling_fails`` says so)."""


def decode_working_bytes(estimated: int, half_precision: bool, compiled: bool = False) -> int:
    """A decode's working memory from the meta device's figure: ``DECODE_WORKING_GROWTH``
    times it for a 16-bit eager decode, ``COMPILED_DECODE_WORKING`` times it for a
    compiled one, as it is for an fp32 one."""
    if compiled and half_precision:
        return int(estimated * COMPILED_DECODE_WORKING)
    return int(estimated * DECODE_WORKING_GROWTH) if half_precision else estimated


def training_working_bytes(estimated: int, config: Config) -> int:
    """A training micro-step's working memory from the meta device's figure, which is
    eager's: where Inductor compiles the whole UNet, ``INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING``
    of it without checkpointing and ``INDUCTOR_TRAINING_WORKING`` with whole blocks
    recomputed under ``default`` (as measured; not with ``memory.keep_attention``, nor
    checkpointing under the graph modes: unmeasured under Inductor)."""
    speed, m = config.speed, config.memory
    whole_graph = speed.compile in INDUCTOR_MODES and speed.compile_scope == "model"
    if not whole_graph or m.keep_attention:
        return estimated
    if not m.gradient_checkpointing:
        return int(estimated * INDUCTOR_UNCHECKPOINTED_TRAINING_WORKING)
    if speed.compile == "default":
        return int(estimated * INDUCTOR_TRAINING_WORKING)
    return estimated


def reserved_bytes(allocated: int, graph_pool: int = 0, growth: int = 0) -> int:
    """What the caching allocator reserves for ``allocated`` live bytes, of which
    ``graph_pool`` sit in CUDA graphs' private pool: that pool is reserved as recorded, so
    the fragmentation ratio applies to the rest only (measured on an H200, 2026-11-26:
    within 3.3% of both rows' first epochs; `estimate.graph_pool_bytes`), and later epochs
    grow by ``growth`` (``later_epoch_growth``)."""
    rest = int((allocated - graph_pool) * fragmentation_ratio())
    return rest + (graph_pool + growth if graph_pool else 0)


CUDA_CONTEXT_BYTES = GB
"""What a process holds on the card besides PyTorch's reserved memory (H100 reading)."""

CARD_SIZES_GB = (4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 80)
"""Memory sizes GPUs are sold with (GiB, as makers count them)."""


def a_card(size_gb: int) -> str:
    """ "a 6 GB card", "an 8 GB card"."""
    article = "an" if str(size_gb).startswith("8") or size_gb in (11, 18) else "a"
    return f"{article} {size_gb} GB card"


def on_card_bytes(reserved: int) -> int:
    """What a card must have for a run that reserves ``reserved`` bytes."""
    return reserved + CUDA_CONTEXT_BYTES


def smallest_card_gb(reserved: int) -> int | None:
    """The smallest card size that holds the run, context included (None: none listed)."""
    need = on_card_bytes(reserved)
    return next((size for size in CARD_SIZES_GB if size * GB >= need), None)
