"""Measure peak CUDA memory and wall-clock time per phase of a real run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from lowvram_ddpo.memory.allocator import release_cached_blocks
from lowvram_ddpo.memory.report import PhaseMemory
from lowvram_ddpo.memory.units import GB


class PhaseMeter:
    """``with meter.phase("training"): ...`` records that phase's peak reserved and allocated
    bytes (``torch.cuda.max_memory_*`` since the phase began) and adds up its seconds.
    Without CUDA only the seconds are recorded.

    With ``release=True`` (the trainer's) each phase also starts on a released allocator
    cache (``release_cached_blocks``), so that its peak is its own, as the memory estimate
    takes it, and not its own plus the blocks the last phase left mapped, cut to other
    shapes (on an H100, 2026-11-27: sampling and decoding as one phase reserved 7.21 GiB
    for 5.59 allocated)."""

    def __init__(self, release: bool = False) -> None:
        self.cuda = torch.cuda.is_available()
        self.release = release
        self.phases: dict[str, PhaseMemory] = {}
        self.starts: dict[str, dict[str, int]] = {}
        """Per phase, the largest reserved and allocated bytes it started on (after the
        release) and the largest free bytes stranded inside the allocator's blocks during
        it (``inactive_split``): what tells memory left by earlier phases, and
        fragmentation within the phase, from the phase's own need."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            if self.release:
                release_cached_blocks()
            torch.cuda.reset_peak_memory_stats()
            start = {
                "reserved": torch.cuda.memory_reserved(),
                "allocated": torch.cuda.memory_allocated(),
            }
        started = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        record = self.phases.setdefault(name, PhaseMemory(name, 0, 0, seconds=0.0))
        record.seconds = (record.seconds or 0.0) + time.perf_counter() - started
        if self.cuda:
            record.peak_reserved = max(record.peak_reserved, torch.cuda.max_memory_reserved())
            record.peak_allocated = max(record.peak_allocated, torch.cuda.max_memory_allocated())
            stats = torch.cuda.memory_stats()
            start["stranded"] = stats.get("inactive_split_bytes.all.peak", 0)
            seen = self.starts.setdefault(name, {})
            for kind, value in start.items():
                seen[kind] = max(seen.get(kind, 0), value)

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds so far in the run: on CUDA between synchronisations at its
        start and end, so the device's time on it (the denoising apart from the decode
        that follows it, say), not the host's."""
        return {name: p.seconds or 0.0 for name, p in self.phases.items()}

    def peaks(self) -> dict[str, int]:
        """The run's peak reserved and allocated bytes so far, per phase and overall (CUDA
        only): reserved is what the card must hold; the gap to allocated is the allocator's
        cache (fragmentation), which the memory estimate models as a fixed share. Beside
        them each phase's ``starts``: ``start_reserved_bytes_<phase>``,
        ``start_allocated_bytes_<phase>`` and ``peak_stranded_bytes_<phase>``."""
        if not self.cuda or not self.phases:
            return {}
        peaks: dict[str, int] = {}
        for kind in ("reserved", "allocated"):
            per_phase = {
                f"peak_{kind}_bytes_{p.name}": getattr(p, f"peak_{kind}")
                for p in self.phases.values()
            }
            peaks |= {f"peak_{kind}_bytes": max(per_phase.values()), **per_phase}
        for name, seen in self.starts.items():
            peaks |= {
                f"start_reserved_bytes_{name}": seen["reserved"],
                f"start_allocated_bytes_{name}": seen["allocated"],
                f"peak_stranded_bytes_{name}": seen["stranded"],
            }
        return peaks


def phase_seconds_since(meter: PhaseMeter, before: dict[str, float]) -> dict[str, float]:
    """The meter's seconds per phase since ``before`` (its ``seconds()`` then), as epoch
    metrics ``phase_seconds_<phase>``: the denoising ("sampling") and the decode apart.
    Phases that did not run since (the prompts' encoding before the first epoch) are left
    out."""
    return {
        f"phase_seconds_{name}": seconds - before.get(name, 0.0)
        for name, seconds in meter.seconds().items()
        if seconds != before.get(name)
    }


def measured(meter: PhaseMeter | None, name: str) -> AbstractContextManager:
    """``meter.phase(name)``, or nothing when there is no meter (sampling outside a run)."""
    return nullcontext() if meter is None else meter.phase(name)


def by_phase(peaks: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``PhaseMeter.peaks()`` (or an epoch's metrics) as {phase: (peak reserved, peak
    allocated)}, in the order the phases first ran."""
    prefix = "peak_reserved_bytes_"
    return {
        k.removeprefix(prefix): (v, peaks.get("peak_allocated_bytes_" + k.removeprefix(prefix), 0))
        for k, v in peaks.items()
        if k.startswith(prefix)
    }


def peak_piece(peaks: dict[str, int]) -> str:
    """The epoch line's memory piece from ``PhaseMeter.peaks()``: the run's peak reserved,
    the phase that holds it and what that phase had allocated ("peak 7.21 GB (sampling,
    5.59 in use)"): a gap between the two is the allocator's cache, not the run's need."""
    phases = by_phase(peaks)
    if not phases:
        return ""
    phase = max(phases, key=lambda name: phases[name][0])
    reserved, allocated = phases[phase]
    return f"  peak {reserved / GB:.2f} GB ({phase}, {allocated / GB:.2f} in use)"
