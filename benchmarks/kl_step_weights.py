"""How much each DDIM step weighs in the KL guard: its KL per unit change of the noise
prediction, ``c_t^2 / (2 sigma_t^2)``, where ``mean = ... + c_t eps`` (so a change d of eps
moves the mean by c_t d, and the step's KL is (c_t d)^2 / (2 sigma_t^2) per dim).

    python benchmarks/kl_step_weights.py [--model pocket] [--steps 10 50] [--eta 1.0]
"""

from __future__ import annotations

import argparse
import json

from lowvram_ddpo.models import resolve_model_name
from lowvram_ddpo.policy import DDIMPolicy


def step_weights(scheduler_config: dict, steps: int, eta: float) -> list[dict]:
    policy = DDIMPolicy(scheduler_config, steps, eta)
    timesteps = policy.timesteps()
    abar_t, abar_prev, sigma = (x.flatten().double() for x in policy.step_coefficients(timesteps))
    c = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() - (abar_prev / abar_t).sqrt() * (
        1 - abar_t
    ).sqrt()
    weight = c**2 / (2 * sigma**2)
    return [
        {
            "step": k,
            "timestep": int(t),
            "sigma": round(float(s), 4),
            "kl_weight": round(float(w), 3),
        }
        for k, (t, s, w) in enumerate(zip(timesteps, sigma, weight, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pocket")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--eta", type=float, default=1.0)
    args = parser.parse_args()
    folder = resolve_model_name(args.model)
    with open(f"{folder}/scheduler/scheduler_config.json") as f:
        config = json.load(f)
    for steps in args.steps:
        rows = step_weights(config, steps, args.eta)
        total = sum(r["kl_weight"] for r in rows)
        heaviest = max(rows, key=lambda r: r["kl_weight"])
        print(
            f"{steps} steps: heaviest step {heaviest['step']} (t={heaviest['timestep']}, "
            f"sigma {heaviest['sigma']}) weighs {heaviest['kl_weight']} of {total:.2f} "
            f"({heaviest['kl_weight'] / total:.0%})"
        )
        print("  " + " ".join(f"{r['kl_weight']}" for r in rows))


if __name__ == "__main__":
    main()
