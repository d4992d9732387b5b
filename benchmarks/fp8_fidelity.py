"""How far an fp8 base's images are from the 16-bit base's (``memory.quantize=fp8``).

    python benchmarks/fp8_fidelity.py                       # the pocket model, on the CPU
    python benchmarks/fp8_fidelity.py --model FOLDER --prompt-set simple_animals --steps 50

Renders the same prompts and seeds with the model's weights as loaded and with its
denoiser in fp8 (``sample --fp8``: the trainer's conversion), through the sampler a run
uses, and prints one JSON line: the images' mean absolute pixel difference and PSNR (in
[0, 1]; per image, then the mean and the worst), and a reward's mean on each (``--reward``;
JPEG incompressibility by default). A trained model's figure, not a random one's: the
pocket model is the one trained model this machine has; a real SD's may differ.
"""

from __future__ import annotations

import argparse
import json

import torch

from lowvram_ddpo.prompts import load_prompts
from lowvram_ddpo.sampling import BASE_PANEL, SampleRequest, render_comparison


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, images in [0, 1] flattened from dim 1 on."""
    mse = (a - b).square().flatten(1).mean(dim=1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def fidelity(
    model: str, prompts: list[str], seeds: list[int], steps: int | None, reward: str
) -> dict[str, object]:
    panels, rewards = {}, {}
    for fp8 in (False, True):
        request = SampleRequest(
            prompts, seeds, model=model, steps=steps, reward=reward, progress=False, fp8=fp8
        )
        result = render_comparison(request)
        panels[fp8] = result.panels[BASE_PANEL].flatten(0, 1)
        rewards[fp8] = float(result.scores[BASE_PANEL].mean())
    difference = (panels[True] - panels[False]).abs().flatten(1).mean(dim=1)
    ratio = psnr(panels[True], panels[False])
    return {
        "model": model,
        "images": len(difference),
        "steps": steps,
        "mean_abs_pixel_difference": float(difference.mean()),
        "worst_abs_pixel_difference": float(difference.max()),
        "psnr_db_mean": float(ratio.mean()),
        "psnr_db_worst": float(ratio.min()),
        "reward": reward,
        "reward_mean_16bit": rewards[False],
        "reward_mean_fp8": rewards[True],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pocket")
    parser.add_argument("--prompt-set", default="pocket_world")
    parser.add_argument("--prompts", type=int, default=16, help="the set's first N")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the sampler's")
    parser.add_argument("--reward", default="jpeg_incompressibility")
    args = parser.parse_args()
    prompts = load_prompts(args.prompt_set)[: args.prompts]
    result = fidelity(args.model, prompts, list(range(args.seeds)), args.steps, args.reward)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
