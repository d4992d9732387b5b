"""A run's measured memory beside the estimate that ``--vram`` fitted it by.

The time model has its check line (``speed.time_model.check_line``); this is memory's:
after the warmed epoch of a run on one CUDA card, the peak reserved of each phase the
trainer measured (``PhaseMeter.peaks``) beside the estimate's for the same settings. On
an H100 (2026-11-27) such a comparison found the sampling-and-decode phase 1.4 GiB over
its estimate (``calibration.DECODE_WORKING_GROWTH`` since): a user's card is where the
next such gap shows, and the line is what they can report.
"""

from __future__ import annotations

from lowvram_ddpo.config import Config
from lowvram_ddpo.memory.estimate import estimate_memory, readable_shape
from lowvram_ddpo.memory.meter import by_phase
from lowvram_ddpo.memory.units import format_size

MEMORY_CHECK_WORTH = 1.10
"""Measured over estimated peak at which the line asks to be reported: above the
reserved-over-allocated calibration's own spread."""


def memory_check_line(config: Config, peaks: dict[str, int]) -> str:
    """ "memory check: peak 7.21 GB reserved in sampling against 5.81 GB estimated
    (1.24); by phase, measured / estimated: ..." ("" without CUDA figures, or where the
    estimate cannot be made: a diagnostic never ends a run)."""
    measured = by_phase(peaks)
    if not measured:
        return ""
    try:
        arch, _ = readable_shape(config, config.model.name)
        report = estimate_memory(config, arch)
    except Exception:  # noqa: BLE001
        return ""
    estimated = {p.name: p.peak_reserved for p in report.phases}
    phase = max(measured, key=lambda name: measured[name][0])
    ratio = measured[phase][0] / report.peak_bytes
    pieces = [
        f"{name} {format_size(reserved)} / {format_size(estimated[name])}"
        for name, (reserved, _allocated) in measured.items()
        if name in estimated
    ]
    ask = (
        ": above the estimate, a fit to this card may overfill it; please report the line"
        if ratio > MEMORY_CHECK_WORTH
        else ""
    )
    return (
        f"memory check: peak {format_size(measured[phase][0])} reserved in {phase} against "
        f"{format_size(report.peak_bytes)} estimated ({ratio:.2f}); by phase, measured / "
        f"estimated: {', '.join(pieces)}{ask}"
    )
