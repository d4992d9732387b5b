"""Does ``train.kl_coef`` stop the pocket quickstart from losing its prompts?

    python benchmarks/kl_guard.py --out docs [--epochs 30] [--kl 0 1.0]

Trains ``pocket-incompressibility`` (DDPO-IS, JPEG incompressibility) once per KL
coefficient from the same seed, then measures each run's prompt accuracy before and after
(``pocket_prompt_accuracy``: the 160 captions x 2 seeds read by the shipped classifier).
Writes ``kl_guard.png`` (reward per epoch) and ``kl_guard.md`` (the table) into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pocket_prompt_accuracy import main as prompt_accuracy

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.reporting.charts import line_chart
from lowvram_ddpo.trainer import train

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def run(kl_coef: float, epochs: int, root: Path) -> dict:
    config = load_preset("pocket-incompressibility")
    apply_overrides(
        config,
        [f"train.kl_coef={kl_coef}", f"run.epochs={epochs}", "run.grid_every=0",
         "run.progress=false", "run.log_with=none"],
    )  # fmt: skip
    validate(config)
    folder = root / f"kl-{kl_coef:g}"
    started = time.perf_counter()
    history = train(config, folder)
    seconds = time.perf_counter() - started
    accuracy = prompt_accuracy([str(folder)])
    return {
        "kl_coef": kl_coef,
        "seconds": round(seconds),
        "rewards": [m["reward_mean"] for m in history],
        "kl_to_base": [m.get("kl_to_base") for m in history],
        "before": accuracy["before"],
        "after": accuracy["after"],
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(results: list[dict]) -> str:
    lines = [
        "| kl_coef | reward, first 3 -> last 3 epochs | prompt accuracy before -> after "
        "| size accuracy before -> after | KL to base, last epoch | train time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rewards, before, after = r["rewards"], r["before"], r["after"]
        kl = r["kl_to_base"][-1]
        lines.append(
            f"| {r['kl_coef']:g} | {mean(rewards[:3]):.3f} -> {mean(rewards[-3:]):.3f} "
            f"| {before['prompt_accuracy']:.3f} -> {after['prompt_accuracy']:.3f} "
            f"| {before['size_accuracy']:.3f} -> {after['size_accuracy']:.3f} "
            f"| {'n/a' if kl is None else f'{kl:.2e}'} | {r['seconds']} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--runs", type=Path, default=Path("runs/kl_guard"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--kl", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args()
    results = [run(kl, args.epochs, args.runs) for kl in args.kl]
    series = {f"kl_coef {r['kl_coef']:g}": list(enumerate(r["rewards"])) for r in results}
    colours = dict(zip(series, COLOURS, strict=False))
    title = "pocket-incompressibility: mean JPEG kB per epoch, with and without the KL guard"
    line_chart(series, colours, "epochs trained", title, args.out / "kl_guard.png")
    text = table(results)
    (args.out / "kl_guard.md").write_text(text + "\n")
    (args.out / "kl_guard.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
