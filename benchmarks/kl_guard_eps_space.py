"""Experiment (not a setting): the KL guard measured in the noise prediction's units.

    python benchmarks/kl_guard_eps_space.py 0.01 --epochs 30

Each step's KL is divided by its weight c_t^2 / sigma_t^2 (``kl_step_weights.py``), so the
penalty is ||eps - eps_base||^2 / 2 per dim at every step instead of being dominated by
the one low-noise step; otherwise ``kl_guard.py``'s run (pocket-incompressibility, seed 42,
then the prompt accuracy). It patches the DDIM policy and the KL in this process only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from kl_guard import run
from torch import Tensor

from lowvram_ddpo.policy import Conditioning, DDIMPolicy, GaussianStep

_ddim_step = DDIMPolicy.__call__
_exact_kl = GaussianStep.kl_to


def step_in_eps_units(
    self: DDIMPolicy, unet: torch.nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning
) -> GaussianStep:
    step = _ddim_step(self, unet, latents, timesteps, cond)
    abar_t, abar_prev, sigma = self.step_coefficients(timesteps.to(latents.device))
    eps_coef = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    c = eps_coef - (abar_prev / abar_t).sqrt() * (1 - abar_t).sqrt()
    step.sigma_over_c = (sigma / c).abs()  # a change d of eps moves the mean by c d
    return step


def kl_in_eps_units(self: GaussianStep, other: GaussianStep) -> Tensor:
    kl = _exact_kl(self, other)
    scale = getattr(self, "sigma_over_c", None)
    return kl if scale is None else kl * scale.flatten() ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kl", type=float)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=Path, default=Path("runs/kl_guard_eps"))
    args = parser.parse_args()
    DDIMPolicy.__call__ = step_in_eps_units
    GaussianStep.kl_to = kl_in_eps_units
    result = run(args.kl, args.epochs, args.runs)
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"eps-{args.kl:g}.json").write_text(json.dumps(result, indent=1))
    rewards = [round(r, 3) for r in result["rewards"]]
    before, after = result["before"]["prompt_accuracy"], result["after"]["prompt_accuracy"]
    print(f"kl_coef {args.kl:g}: rewards {rewards}; prompt accuracy {before} -> {after}")


if __name__ == "__main__":
    main()
