"""Measure peak CUDA memory and wall-clock time per phase of a real run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowvram_ddpo.memory.report import PhaseMemory


class PhaseMeter:
    """``with meter.phase("training"): ...`` records that phase's peak reserved and allocated
    bytes (``torch.cuda.max_memory_*`` since the phase began) and adds up its seconds.
    Without CUDA only the seconds are recorded."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.phases: dict[str, PhaseMemory] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        record = self.phases.setdefault(name, PhaseMemory(name, 0, 0, seconds=0.0))
        record.seconds = (record.seconds or 0.0) + time.perf_counter() - started
        if self.cuda:
            record.peak_reserved = max(record.peak_reserved, torch.cuda.max_memory_reserved())
            record.peak_allocated = max(record.peak_allocated, torch.cuda.max_memory_allocated())

    def peaks(self) -> dict[str, int]:
        """The run's peak reserved and allocated bytes so far, per phase and overall (CUDA
        only): reserved is what the card must hold; the gap to allocated is the allocator's
        cache (fragmentation), which the memory estimate models as a fixed share."""
        if not self.cuda or not self.phases:
            return {}
        peaks: dict[str, int] = {}
        for kind in ("reserved", "allocated"):
            per_phase = {
                f"peak_{kind}_bytes_{p.name}": getattr(p, f"peak_{kind}")
                for p in self.phases.values()
            }
            peaks |= {f"peak_{kind}_bytes": max(per_phase.values()), **per_phase}
        return peaks
