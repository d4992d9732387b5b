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

from PIL import Image, ImageDraw, ImageFont

from lowvram_ddpo.config import apply_overrides, load_preset, validate
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
    """A plain line chart drawn with PIL: reward mean against reward queries."""
    width, height, margin = 720, 440, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    series = {
        name: [(sum(m["samples"] for m in h[: i + 1]), m["reward_mean"]) for i, m in enumerate(h)]
        for name, h in results.items()
    }
    xs = [x for s in series.values() for x, _ in s]
    ys = [y for s in series.values() for _, y in s]
    x0, x1, y0, y1 = 0, max(xs), min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
            height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin),
        )

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y)
        draw.text((5, py - 6), f"{y:.3g}", fill="black", font=font)
        x = x0 + (x1 - x0) * i / 4
        px, _ = to_px(x, y0)
        draw.text((px - 10, height - margin + 5), f"{x:.0f}", fill="black", font=font)
    draw.text(
        (width // 2 - 60, height - 25), "reward queries (images scored)", fill="black", font=font
    )
    draw.text((margin, 20), title, fill="black", font=font)
    for i, (name, points) in enumerate(series.items()):
        draw.line([to_px(x, y) for x, y in points], fill=COLOURS[name], width=2)
        draw.text((width - margin - 90, margin + 8 + 14 * i), name, fill=COLOURS[name], font=font)
    image.save(path)


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
