"""What the CUDA-graph modes of ``speed.compile`` need around the compiled UNet.

cudagraph trees (``reduce-overhead``, ``cudagraphs``) leave each replayed graph's outputs
in the graph's own memory pool, where a later replay overwrites them: the UNet's output,
and in the backward graph the LoRA gradients. Two uses of ours would read such memory
after it was overwritten:

- gradient accumulation: after ``zero_grad`` the first micro-step's gradient *is* the
  pool's tensor, so the next replay corrupts the sum (pytorch#96693: silently wrong
  gradients; pytorch#169545; fixed for Inductor only after torch 2.11, pytorch#184153).
  Each gradient is copied out of the pool as it is produced.
- outputs kept past the next call (the KL guard's base-model step, NFT's old velocity, an
  fp32 run's ``.float()`` that copies nothing): each call starts a new step
  (``cudagraph_mark_step_begin``, which the ``cudagraphs`` backend of torch 2.11 needs
  after calls without gradients, pytorch#174713) and hands back copies.

Both change no number (a CPU test checks the outputs and accumulated gradients against
eager); they cost a copy of the LoRA gradients per backward and of the UNet's output per
call, small beside the UNet. Found by a search of PyTorch's issues (2026-11-25), not yet
seen on a GPU here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

GRAPH_MODES = ("reduce-overhead", "max-autotune", "cudagraphs")
"""``speed.compile`` modes whose calls replay CUDA graphs (cudagraph trees; Inductor's
``max-autotune`` turns on ``triton.cudagraphs`` as ``reduce-overhead`` does)."""


def replays_cuda_graphs(mode: str, backend: str) -> bool:
    """Whether calls of a UNet compiled with ``mode`` and ``backend`` replay CUDA graphs."""
    return mode in GRAPH_MODES or backend == "cudagraphs"


def keep_gradients_out_of_the_pool(unet: torch.nn.Module) -> None:
    """Copy each trainable parameter's gradient as the backward produces it."""
    for p in unet.parameters():
        if p.requires_grad:
            p.register_hook(torch.clone)  # the hook's result is what accumulates


def new_step_per_call(unet: torch.nn.Module) -> None:
    """Each call of the compiled ``unet`` starts a new cudagraph step and returns copies
    of its outputs (``unet.compile`` must have run)."""
    compiled: Callable = unet._compiled_call_impl  # what nn.Module.compile installs
    if compiled is None:
        raise ValueError("new_step_per_call needs a module compiled in place")

    def call(*args: object, **kwargs: object) -> object:
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))

    unet._compiled_call_impl = call


def make_graph_safe(unet: torch.nn.Module) -> None:
    """Both guards, for a UNet compiled in a CUDA-graph mode."""
    keep_gradients_out_of_the_pool(unet)
    new_step_per_call(unet)


@dataclass
class GraphEvents:
    """What cudagraph trees did so far in this process (``count_graph_events``)."""

    recorded: int = 0
    """CUDA graphs recorded: each holds its working memory in the pool for the run."""
    warmups: int = 0
    """Warm-up nodes: calls run eagerly inside the pool before (or instead of) a
    recording, a function's first call among them."""
    pool_restores: int = 0
    """The allocator's pool state set back to a recorded one, to record another graph
    beside live tensors."""


GRAPH_EVENTS = GraphEvents()
_COUNTED = {
    "new_graph_id": "recorded",
    "new_warmup_node_id": "warmups",
    "apply_checkpoint_execution_state_in_allocator": "pool_restores",
}
"""cudagraph trees' manager methods (torch 2.13's; looked for at run time) and the count
each call adds to."""


def count_graph_events() -> bool:
    """From now on, count cudagraph trees' recordings, warm-ups and pool restores in
    ``GRAPH_EVENTS`` (once per process). Under CUDA graphs the reserved memory rose by
    1.0-1.4 GiB after the first epoch on an H100 and an H200 (2026-11-26), cause unknown:
    a graph recorded again would explain it, and these counts per epoch tell. False where
    this torch's private manager has other methods (nothing is counted then)."""
    manager = _tree_manager_class()
    if manager is None or not all(callable(getattr(manager, n, None)) for n in _COUNTED):
        return False
    if graph_events_counted():
        return True
    for name, field in _COUNTED.items():
        setattr(manager, name, _counting(getattr(manager, name), field))
    manager._lowvram_ddpo_counted = True
    return True


def graph_events_counted() -> bool:
    """Whether ``count_graph_events`` hooked this torch's manager (else the counts stay 0
    whatever the graphs do: nothing to report)."""
    return getattr(_tree_manager_class(), "_lowvram_ddpo_counted", False)


def _tree_manager_class() -> type | None:
    """cudagraph trees' manager class, None where this torch has none."""
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    except ImportError:
        return None
    return CUDAGraphTreeManager


def _counting(method: Callable, field: str) -> Callable:
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        setattr(GRAPH_EVENTS, field, getattr(GRAPH_EVENTS, field) + 1)
        return method(*args, **kwargs)

    return counted


def graph_events_since(before: GraphEvents) -> dict[str, int]:
    """The counts since ``before`` (a copy of ``GRAPH_EVENTS``), as epoch metrics."""
    return {
        f"cuda_graph_{name}": getattr(GRAPH_EVENTS, name) - getattr(before, name)
        for name in (f.name for f in dataclasses.fields(GraphEvents))
    }


def graph_events_piece(metrics: dict) -> str:
    """The epoch line's piece for the CUDA graphs an epoch recorded ("" for none, or where
    they are not counted): a run cut before its metrics are written still showed them."""
    recorded = metrics.get("cuda_graph_recorded", 0)
    if not recorded:
        return ""
    return f"  graphs recorded {recorded} (warm-ups {metrics.get('cuda_graph_warmups', 0)})"


def recorded_again_note(metrics: dict, mode: str, first_epoch: bool) -> str:
    """One line when an epoch other than the process's first recorded a CUDA graph (""
    otherwise): every call the run graphs is recorded in its first epoch."""
    recorded = metrics.get("cuda_graph_recorded", 0)
    if first_epoch or not recorded:
        return ""
    return (
        f"note: speed.compile={mode} recorded {recorded} CUDA graph(s) again in epoch "
        f"{metrics['epoch']} ({metrics.get('cuda_graph_warmups', 0)} warm-up runs): each "
        "recording may hold more of the graphs' memory pool (on an H100 the peak rose 1.4 "
        "GiB after the first epoch). Please report this line"
    )
