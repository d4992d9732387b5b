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
added to every phase."""


DECODE_WORKING_GROWTH = 1.44
"""The VAE decode's working memory over the meta-device estimate's, inferred from one
row: SD 1.5 at 512 px, 4 images per decode call under fp16 autocast (H100, 2026-11-27,
`bench speed --vram 7GB`). The sampling phase, which then held the denoising and the
decode together, allocated 5.55 and 5.59 GiB at its peak in its two epochs; ~2.0 GiB
were held before the decode (the encode phase: 2.02 measured, 2.01 estimated) and the
denoising alone is estimated at 3.05, so the peak is taken as the decode's: 3.59 GiB of
working memory where the estimate counted 2.50 (its decode phase: 4.50 allocated).
Likely the copies cuDNN makes of the NCHW activations into its NHWC layout, which the
meta device does not see (a hypothesis: `benchmarks/decode_batch.py` measures the decode
alone). Applied to every 16-bit decode, at any width: a decode one step narrower than
fits costs a few milliseconds an image, one wider than fits the run. Not to fp32 ones
(SDXL's upcast VAE, CPU runs): unmeasured, and cuDNN's layout for them is another
question."""


def decode_working_bytes(estimated: int, half_precision: bool) -> int:
    """A decode's working memory from the meta device's figure: ``DECODE_WORKING_GROWTH``
    times it for a 16-bit decode, as it is for an fp32 one."""
    return int(estimated * DECODE_WORKING_GROWTH) if half_precision else estimated


def reserved_bytes(allocated: int, graph_pool: int = 0) -> int:
    """What the caching allocator reserves for ``allocated`` live bytes, of which
    ``graph_pool`` sit in CUDA graphs' private pool: that pool is reserved as recorded, so
    the fragmentation ratio applies to the rest only (measured on an H200, 2026-11-26:
    within 3.3% of both rows' first epochs; `estimate.graph_pool_bytes`), and later epochs
    grow by ``GRAPHS_LATER_EPOCH_GROWTH``."""
    rest = int((allocated - graph_pool) * fragmentation_ratio())
    return rest + (graph_pool + GRAPHS_LATER_EPOCH_GROWTH if graph_pool else 0)


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
