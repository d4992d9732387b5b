"""``RUN/metrics.png``: the reward over the run, against the base model's.

Epoch N's samples are drawn by the policy as it was after N - 1 epochs of training, so
they are plotted at x = N - 1: x = 0 is the base model, whose mean reward is the dashed
baseline. The held-out evaluation runs after an epoch's training: eval after epoch N at x = N.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lowvram_ddpo.atomic import write_atomic_with
from lowvram_ddpo.reporting.charts import line_chart

METRICS_CHART = "metrics.png"
COLOURS = {"reward": "#1f77b4", "eval reward": "#d62728", "base model": "#7f7f7f"}


def write_metrics_chart(history: list[dict], path: Path, reward_name: str) -> None:
    """Redraw the chart from every epoch's metrics so far (``metrics.jsonl``'s records)."""
    series = {
        "reward": _finite([(m["epoch"] - 1, m["reward_mean"]) for m in history]),
        "eval reward": _finite([(m["epoch"], m.get("eval_reward_mean")) for m in history]),
    }
    series = {name: points for name, points in series.items() if points}
    if not series:
        return
    first = min(history, key=lambda m: m["epoch"])
    base = first["reward_mean"] if first["epoch"] == 1 else math.nan
    levels = {"base model": base} if math.isfinite(base) else {}
    title = f"mean {reward_name} reward per epoch (x = epochs trained before sampling)"

    def draw(tmp: Path) -> None:
        line_chart(series, COLOURS, "epochs trained", title, tmp, levels, image_format="PNG")

    write_atomic_with(path, draw)


def _finite(points: list[tuple[int, float | None]]) -> list[tuple[int, float]]:
    """The points with a number (a diverged epoch logs NaN; eval runs every N epochs)."""
    return [(x, y) for x, y in points if y is not None and math.isfinite(y)]


def read_metrics(path: Path) -> list[dict]:
    """``metrics.jsonl``'s records, one per finished epoch."""
    if not path.is_file():
        return []
    return [record for record in map(decoded, path.read_text().splitlines()) if record]


def decoded(line: str) -> dict | None:
    """A metrics line's record; None for a blank line or one cut short (the disk filled as
    it was written: the run stopped there, and a resume goes on past it)."""
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
