"""RLCM against DDPO on our own models, as the RLCM paper compares them (on a CPU).

    python benchmarks/rlcm_comparison.py --task incompressibility --seconds 120

Trains DDPO (the `pocket-<task>` preset: 10 DDIM steps with classifier-free guidance)
and RLCM (`pocket-rlcm-<task>`: 4 LCM steps, guidance embedded) from the same seed for
the same wall-clock budget, then writes reward against seconds and against reward
queries (docs/rlcm_<task>.png) and a table with the speed-up ratio (docs/rlcm_<task>.md):
the time RLCM needs to first reach DDPO's final reward, over DDPO's time. Rewards are
smoothed over 3 epochs before comparing, as a single epoch of 64 samples is noisy.
Run it alone on the machine: it compares wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import accumulate
from pathlib import Path

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.reporting.charts import line_chart
from lowvram_ddpo.trainer import train

COLOURS = {"DDPO": "#1f77b4", "RLCM": "#d62728"}


def run_for(
    preset: str, seconds: float, seed: int, folder: Path, overrides: list[str]
) -> list[dict]:
    """Epochs of ``preset`` until ``seconds`` of training-loop time have been spent."""
    common = [f"run.seed={seed}", "run.grid_every=0", "run.progress=false", *overrides]
    probe = load_preset(preset)
    apply_overrides(probe, [*common, "run.epochs=1"])
    validate(probe)
    started = time.perf_counter()
    first = train(probe, folder / "probe")
    per_epoch = time.perf_counter() - started
    epochs = max(2, int(seconds / max(_loop_seconds(first[0]), 1e-3)) + 1)
    config = load_preset(preset)
    apply_overrides(config, [*common, f"run.epochs={epochs}"])
    validate(config)
    print(f"{preset}: ~{per_epoch:.1f}s for the first epoch, running {epochs} epochs", flush=True)
    return train(config, folder / preset)


def _loop_seconds(metrics: dict) -> float:
    return metrics["seconds_sampling"] + metrics["seconds_reward"] + metrics["seconds_training"]


def curve(history: list[dict]) -> list[tuple[float, int, float]]:
    """(cumulative seconds, cumulative reward queries, reward smoothed over 3 epochs)."""
    seconds = list(accumulate(_loop_seconds(m) for m in history))
    queries = list(accumulate(m["samples"] for m in history))
    rewards = [m["reward_mean"] for m in history]
    windows = [rewards[max(0, i - 2) : i + 1] for i in range(len(rewards))]
    smooth = [sum(w) / len(w) for w in windows]
    return list(zip(seconds, queries, smooth, strict=True))


def speedup(ddpo: list[tuple], rlcm: list[tuple], budget: float) -> dict:
    ddpo = [p for p in ddpo if p[0] <= budget] or ddpo[:1]
    target, ddpo_time = ddpo[-1][2], ddpo[-1][0]
    reached = next((p for p in rlcm if p[2] >= target), None)
    return {
        "ddpo_final_reward": target,
        "ddpo_seconds": ddpo_time,
        "rlcm_seconds_to_reach_it": None if reached is None else reached[0],
        "ratio": None if reached is None else reached[0] / ddpo_time,
        "rlcm_reward_at_budget": max((p for p in rlcm if p[0] <= budget), key=lambda p: p[0])[2],
    }


def plot(curves: dict[str, list[tuple]], axis: int, label: str, title: str, path: Path) -> None:
    """Smoothed reward against seconds (``axis`` 0) or reward queries (``axis`` 1)."""
    series = {name: [(p[axis], p[2]) for p in points] for name, points in curves.items()}
    line_chart(series, COLOURS, label, title, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--task", choices=["incompressibility", "compressibility"], default="incompressibility"
    )
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=Path, default=Path("runs/rlcm-comparison"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--name", default="", help="suffix of the output files")
    parser.add_argument("--ddpo-set", action="append", default=[], help="override for DDPO")
    parser.add_argument("--rlcm-set", action="append", default=[], help="override for RLCM")
    args = parser.parse_args()
    runs = args.runs / (args.name or "default")
    histories = {
        "DDPO": run_for(f"pocket-{args.task}", args.seconds, args.seed, runs, args.ddpo_set),
        "RLCM": run_for(f"pocket-rlcm-{args.task}", args.seconds, args.seed, runs, args.rlcm_set),
    }
    stem = f"rlcm_{args.task}" + (f"_{args.name}" if args.name else "")
    curves = {name: curve(h) for name, h in histories.items()}
    result = speedup(curves["DDPO"], curves["RLCM"], args.seconds)
    title = f"pocket models, JPEG {args.task}, reward (3-epoch mean)"
    plot(curves, 0, "seconds of training loop", title, args.docs / f"{stem}_time.png")
    plot(curves, 1, "reward queries", title, args.docs / f"{stem}_queries.png")
    extra = [f"--ddpo-set {o}" for o in args.ddpo_set] + [f"--rlcm-set {o}" for o in args.rlcm_set]
    command = " ".join(
        [
            f"python benchmarks/rlcm_comparison.py --task {args.task}",
            f"--seconds {args.seconds:g} --seed {args.seed}",
            *([f"--name {args.name}"] if args.name else []),
            *extra,
        ]
    )
    lines = [
        f"Command: `{command}`",
        "",
        "| method | epochs | seconds | reward queries | first-epoch reward "
        "| final reward (3-epoch mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, points in curves.items():
        history = histories[name]
        lines.append(
            f"| {name} | {len(history)} | {points[-1][0]:.0f} | {points[-1][1]} "
            f"| {history[0]['reward_mean']:.4f} | {points[-1][2]:.4f} |"
        )
    lines += ["", "```", json.dumps(result, indent=2), "```"]
    (args.docs / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (runs / f"{args.task}.json").write_text(json.dumps(histories))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
