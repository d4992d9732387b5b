"""One line per stage of a GPU session (`benchmarks/gpu_session.sh`): what a reader needs
first, from the session's results.jsonl.

    python benchmarks/session_summary.py OUT/results.jsonl

A `bench speed` row gives its samples/s (the timed epochs' spread where several were
timed), per-phase seconds, MFU, peaks beside the memory estimate, replay and compile
cache; where the same file holds the reference's run (`reference` stage), also its
ratio to the reference's samples/s (sampling + training seconds per image, as the
issue's goal counts them), so a side-by-side call is read without arithmetic.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable


def reference_rate(rows: Iterable[dict]) -> float | None:
    """The reference's samples/s in its default run (1 / (sampling + training seconds per
    image)), or None when no row holds it."""
    for row in rows:
        result = row.get("result")
        if isinstance(result, dict) and "runs" in result:
            rates = result["runs"].get("default", {}).get("rates", {})
            sampling, training = (
                rates.get("sampling_s_per_image"),
                rates.get("training_s_per_sample"),
            )
            if sampling and training:
                return 1.0 / (sampling + training)
    return None


def gib(value: float | None) -> str:
    return f"{value / 2**30:.2f}" if value is not None else "?"


def share(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"  # no MFU on a CPU


def peaks_by_phase(r: dict) -> str:
    """Each phase's reserved/allocated peak, the estimate's reserved beside it, what the
    phase started on (after the cache's release) and the free bytes stranded inside it."""
    peaks = (r.get("peak_so_far_by_epoch") or [{}])[-1]
    estimate = r.get("memory_estimate") or {}
    parts = []
    for phase in ("sampling", "decode", "training"):
        if f"peak_reserved_bytes_{phase}" not in peaks:
            continue
        part = (
            f"{phase} {gib(peaks[f'peak_reserved_bytes_{phase}'])}/"
            f"{gib(peaks.get(f'peak_allocated_bytes_{phase}'))}"
        )
        if phase in estimate:
            part += f" (est {gib(estimate[phase]['reserved'])})"
        if f"start_reserved_bytes_{phase}" in peaks:
            part += (
                f" [start {gib(peaks[f'start_reserved_bytes_{phase}'])}, stranded "
                f"{gib(peaks.get(f'peak_stranded_bytes_{phase}'))}]"
            )
        parts.append(part)
    return ", ".join(parts)


def speed_line(r: dict, reference: float | None) -> str:
    """A `bench speed` row's figures."""
    s, mfu = r["seconds_per_image"], r["mfu"]
    spread = r.get("images_per_second_range")  # the timed epochs' slowest and fastest
    text = f"{r['images_per_second']:.3f}"
    text += f" ({spread[0]:.3f}-{spread[1]:.3f})" if spread else ""
    text += " img/s"
    if reference:
        text += f" = {r['images_per_second'] / reference:.2f}x the reference"
        text += f" ({spread[0] / reference:.2f}-{spread[1] / reference:.2f})" if spread else ""
    text += (
        f"  compile {(r.get('settings') or {}).get('compile', '?')}  sampling "
        f"{s['sampling']:.3f} training {s['training']:.3f} s/img  MFU {share(mfu['sampling'])}/"
        f"{share(mfu['training'])} (recomputation counted "
        f"{share(r.get('mfu_training_with_recomputation'))}; denoising alone "
        f"{share(r.get('mfu_denoising'))})  "
    )
    phases = r.get("phase_seconds") or {}
    if {"sampling", "decode"} <= phases.keys():
        text += f"denoise/decode {phases['sampling']:.2f}/{phases['decode']:.2f} s  "
    peaks = (r.get("peak_so_far_by_epoch") or [{}])[-1]
    text += (
        f"warm-up {r['warmup_seconds']:.0f} s  peak reserved/allocated "
        f"{gib(peaks.get('peak_reserved_bytes'))}/{gib(peaks.get('peak_allocated_bytes'))} GiB"
    )
    if by_phase := peaks_by_phase(r):
        text += f" ({by_phase})"
    if replay := r.get("replay"):
        text += f"  replay {replay['replay_rms']:.2e}"
    recorded = [e["cuda_graph_recorded"] for e in r.get("cuda_graph_events_by_epoch", [])]
    if recorded:
        text += f"  graphs recorded per epoch {recorded}"
    if cache := r.get("compile_cache"):  # hits/misses/bypassed, Inductor's then AOT's
        text += (
            f"  cache {cache['inductor_hits']}/{cache['inductor_misses']}/"
            f"{cache['inductor_bypassed']} aot {cache['aot_autograd_hits']}/"
            f"{cache['aot_autograd_misses']}/{cache['aot_autograd_bypassed']}"
        )
    return text


def decode_line(rows: list[dict]) -> str:
    """`benchmarks/decode_batch.py`'s rows: ms per image and working memory per width."""
    return "decode per call: " + "; ".join(
        f"{d['decode_batch']}: {d['ms_per_image']} ms/img, working {gib(d.get('working_bytes'))} "
        f"GiB (meta estimate {gib(d.get('estimated_working_bytes'))}, calibrated "
        f"{gib(d.get('calibrated_working_bytes'))})"
        for d in rows
    )


def profile_line(r: dict) -> str:
    """`benchmarks/unet_profile.py`'s row: per UNet call, wall ms, kernels and their ms."""
    calls = "; ".join(
        f"{name} {c['ms_per_call']} ms, {c['kernels']} kernels in {c['kernel_ms']} ms"
        if "kernels" in c
        else f"{name} {c['ms_per_call']} ms"
        for name, c in r["calls"].items()
    )
    return f"profile {r['variant']}: {calls}  peak reserved {r.get('peak_reserved_gib')} GiB"


def reference_lines(head: str, r: dict) -> list[str]:
    lines = []
    for name, run in r["runs"].items():
        rates = run.get("rates", {})
        lines.append(
            f"{head}  reference {name}: sampling {rates.get('sampling_s_per_image')} "
            f"training {rates.get('training_s_per_sample')} s/img  peak reserved "
            f"{run.get('memory_GiB', {}).get('max_memory_reserved')} GiB"
        )
    return lines


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per stage (a reference run may give one per run)."""
    reference = reference_rate(rows)
    lines = []
    for row in rows:
        if row.get("skipped"):
            lines.append(f"{row['stage']:<24} skipped ({row['skipped']})")
            continue
        r = row.get("result")
        head = f"{row['stage']:<24} exit {row['rc']:<3} {row['seconds']:>4} s"
        if isinstance(r, dict) and "images_per_second" in r:
            lines.append(f"{head}  {speed_line(r, reference)}")
        elif isinstance(r, list) and r and isinstance(r[0], dict) and "decode_batch" in r[0]:
            lines.append(f"{head}  {decode_line(r)}")
        elif isinstance(r, dict) and "runs" in r:
            lines += reference_lines(head, r)
        elif r and all(isinstance(p, dict) and "calls" in p for p in _listed(r)):
            lines += [f"{head}  {profile_line(p)}" for p in _listed(r)]
        else:
            tail = json.dumps(r)[:300] if r is not None else row.get("output_tail", "")[-300:]
            lines.append(f"{head}  {tail}")
    return lines


def _listed(result: dict | list) -> list:
    """A stage's JSON objects as a list (a stage printing several gives a list)."""
    return result if isinstance(result, list) else [result]


def main(path: str) -> None:
    with open(path) as results:
        rows = [json.loads(line) for line in results if line.strip()]
    print("\n".join(summary_lines(rows)))


if __name__ == "__main__":
    main(sys.argv[1])
