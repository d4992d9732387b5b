"""What `bench memory` reports: peak memory per phase of an epoch, and overall."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lowvram_ddpo.memory.calibration import CUDA_CONTEXT_BYTES, a_card, smallest_card_gb
from lowvram_ddpo.memory.units import format_size


@dataclass
class PhaseMemory:
    name: str
    """encode, sampling, decode, reward or training."""
    peak_allocated: int
    """Bytes of live tensors at the phase's peak."""
    peak_reserved: int
    """Bytes the CUDA caching allocator holds at the peak (what a card must have, plus
    the CUDA context of ~0.3-0.5 GB)."""
    held: dict[str, int] = field(default_factory=dict)
    """What sits on the device during the phase besides its working tensors (estimate)."""
    seconds: float | None = None
    """Wall-clock seconds of the phase (measured runs only)."""


@dataclass
class MemoryReport:
    method: str
    """'cuda' (measured with torch.cuda) or 'estimate' (meta-device model, no GPU)."""
    arch: str
    settings: dict[str, object]
    phases: list[PhaseMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_reserved for p in self.phases)

    @property
    def peak_allocated_bytes(self) -> int:
        return max(p.peak_allocated for p in self.phases)

    @property
    def card_gb(self) -> int | None:
        """The smallest card size the run fits, CUDA context included (None: above 80)."""
        return smallest_card_gb(self.peak_bytes)

    def card_line(self) -> str:
        context = f"peak reserved + ~{format_size(CUDA_CONTEXT_BYTES)} CUDA context"
        if self.card_gb is None:
            return f"needs a card above 80 GB ({context})"
        return f"fits {a_card(self.card_gb)} ({context})"

    def phase(self, name: str) -> PhaseMemory:
        return next(p for p in self.phases if p.name == name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "arch": self.arch,
                "peak_bytes": self.peak_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes,
                "fits_card_gb": self.card_gb,
                "phases": {
                    p.name: {
                        "peak_bytes": p.peak_reserved,
                        "peak_allocated_bytes": p.peak_allocated,
                        "seconds": p.seconds,
                        "held": p.held,
                    }
                    for p in self.phases
                },
                "settings": self.settings,
                "notes": self.notes,
            },
            indent=2,
        )

    def to_text(self) -> str:
        kind = "measured on CUDA" if self.method == "cuda" else "estimated without a GPU"
        lines = [f"peak memory per phase, {self.arch}, {kind}:"]
        for p in self.phases:
            seconds = "" if p.seconds is None else f"  {p.seconds:7.2f} s"
            held = ", ".join(f"{k} {format_size(v)}" for k, v in p.held.items() if v)
            lines.append(
                f"  {p.name:<9} reserved {format_size(p.peak_reserved):>9}"
                f"  allocated {format_size(p.peak_allocated):>9}{seconds}"
                + (f"  (holding {held})" if held else "")
            )
        lines.append(f"  overall   reserved {format_size(self.peak_bytes):>9}: {self.card_line()}")
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
