"""The reward interface and its registry.

A reward maps a batch of images ([B, 3, H, W] floats in [0, 1], on the CPU) and
their prompts to a [B] float tensor. A new reward is one file in this folder that
decorates a factory with ``@register_reward("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lowvram_ddpo.errors import UserError


class Reward(Protocol):
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


_REGISTRY: dict[str, tuple[Callable[[], Reward], str]] = {}


def register_reward(name: str, description: str) -> Callable:
    """Class or factory decorator: ``build_reward(name)`` calls it with no arguments."""

    def decorator(factory: Callable[[], Reward]) -> Callable[[], Reward]:
        _REGISTRY[name] = (factory, description)
        return factory

    return decorator


def available_rewards() -> dict[str, str]:
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def build_reward(name: str) -> Reward:
    if name not in _REGISTRY:
        raise UserError(f"unknown reward '{name}': use one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]()


def check_rewards(rewards: Tensor, batch_size: int, name: str) -> Tensor:
    """Rewards must be one finite number per image; say so plainly when they are not."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if rewards.numel() != batch_size:
        raise UserError(
            f"reward '{name}' returned {rewards.numel()} values for {batch_size} images"
        )
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).sum().item()
        raise UserError(
            f"reward '{name}' returned {bad} NaN/inf values: check the reward model and inputs"
        )
    return rewards
