"""Rerun the DDPO paper's comparison (Fig. 4) on the pocket model, on a CPU.

    python benchmarks/paper_comparison.py --task incompressibility --epochs 20

Trains DDPO-IS, DDPO-SF, RWR and sparse RWR from the same pocket preset and seed, then
writes reward against reward queries as a plot (docs/pocket_<task>.png) and a table
(docs/pocket_<task>.md). Each run is an ordinary `lowvram-ddpo train` run folder
under runs/paper-comparison/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.reporting.charts import line_chart
from lowvram_ddpo.trainer import train

ALGORITHMS = ("ddpo-is", "ddpo-sf", "rwr", "sparse-rwr")
COLOURS = {"ddpo-is": "#1f77b4", "ddpo-sf": "#2ca02c", "rwr": "#d62728", "sparse-rwr": "#9467bd"}


def run_all(task: str, epochs: int, seed: int, root: Path) -> dict[str, list[dict]]:
    results = {}
    for algorithm in ALGORITHMS:
        config = load_preset(f"pocket-{task}")
        apply_overrides(
            config,
            [
                f"train.algorithm={algorithm}",
                f"run.epochs={epochs}",
                f"run.seed={seed}",
                "run.grid_every=0",
                "run.progress=false",
            ],
        )
        validate(config)
        run_dir = root / f"{task}-{algorithm}"
        started = time.perf_counter()
        results[algorithm] = train(config, run_dir)
        print(f"{algorithm}: {time.perf_counter() - started:.0f}s", flush=True)
    return results


def plot(results: dict[str, list[dict]], title: str, path: Path) -> None:
    """Reward mean against cumulative reward queries, one line per algorithm."""
    series = {
        name: [(sum(m["samples"] for m in h[: i + 1]), m["reward_mean"]) for i, m in enumerate(h)]
        for name, h in results.items()
    }
    line_chart(series, COLOURS, "reward queries (images scored)", title, path)


def table(results: dict[str, list[dict]], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| algorithm | first epoch reward | last epoch reward | best epoch reward "
        "| reward queries | train seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, history in results.items():
        rewards = [m["reward_mean"] for m in history]
        seconds = sum(
            m["seconds_sampling"] + m["seconds_reward"] + m["seconds_training"] for m in history
        )
        queries = sum(m["samples"] for m in history)
        lines.append(
            f"| {name} | {rewards[0]:.4f} | {rewards[-1]:.4f} | {max(rewards):.4f} "
            f"| {queries} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument(
        "--task", choices=["incompressibility", "compressibility"], default="incompressibility"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=Path, default=Path("runs/paper-comparison"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args()
    command = (
        f"python benchmarks/paper_comparison.py --task {args.task} "
        f"--epochs {args.epochs} --seed {args.seed}"
    )
    results = run_all(args.task, args.epochs, args.seed, args.runs)
    args.docs.mkdir(parents=True, exist_ok=True)
    plot(
        results,
        f"pocket model, JPEG {args.task}: reward vs reward queries",
        args.docs / f"pocket_{args.task}.png",
    )
    (args.docs / f"pocket_{args.task}.md").write_text(table(results, command))
    (args.runs / f"{args.task}.json").write_text(json.dumps(results))
    print(table(results, command))


if __name__ == "__main__":
    main()
