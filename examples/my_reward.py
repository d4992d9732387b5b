"""Example rewards of your own: copy this file, change a function, train on it.

    lowvram-ddpo train --preset incompressibility --reward examples/my_reward.py:colorfulness

    # a minute on a CPU to check that your file works, on the shipped pocket model (its
    # prompts name every colour, so these two rewards barely move there: measured)
    lowvram-ddpo train --preset pocket-incompressibility --epochs 2 \
        --reward examples/my_reward.py:brightness

Each reward takes ``images``, a float tensor [B, 3, H, W] in [0, 1] on the CPU, and
``prompts``, B strings, and returns one number per image (bigger is better). It runs
without gradients. A class works too: it is built once (load a model in ``__init__``).
"""

from __future__ import annotations

import torch


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: lighter images score higher (0 to 1)."""
    return images.mean(dim=(1, 2, 3))


def colorfulness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Hasler and Suesstrunk's colourfulness (2003): spread and strength of the opponent
    colour channels, as in image-quality work; about 0 for grey images, ~1 for vivid ones
    (on this 0-1 scale)."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    rg, yb = r - g, (r + g) / 2 - b
    spread = (rg.std(dim=(1, 2)) ** 2 + yb.std(dim=(1, 2)) ** 2).sqrt()
    strength = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2).sqrt()
    return spread + 0.3 * strength


class PromptLength:
    """A class reward (built once): here a toy that prefers images of longer prompts'
    rows to be darker, to show where a model would be loaded and how prompts arrive."""

    def __init__(self) -> None:
        self.longest = 80  # e.g. load a scorer here: self.model = ...from_pretrained(...)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weight = torch.tensor([min(len(p), self.longest) / self.longest for p in prompts])
        return 1 - weight * images.mean(dim=(1, 2, 3))
