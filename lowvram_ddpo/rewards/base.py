"""The reward interface and its registry.

A reward maps a batch of images ([B, 3, H, W] floats in [0, 1], on the CPU) and
their prompts to a [B] float tensor. A new reward is one file in this folder that
decorates a factory with ``@register_reward("name", "description")``; the factory
is called with the run's ``RewardConfig`` and the dtype for any network it loads.

Rewards computed by a network derive from ``ModelReward``: the trainer keeps their
``module`` on the CPU and moves it to the GPU only while scoring (memory.offload),
and the memory benchmark builds the same network with random weights
(``with_random_weights``): on the meta device to estimate, on the GPU to measure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lowvram_ddpo.config import OWN_REWARD_HINT, RewardConfig, is_own_reward
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.memory.narrowing import NarrowingWidth


class Reward(Protocol):
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


class ModelReward(ABC):
    """A reward that runs a network, scored in micro-batches on the network's device."""

    module: torch.nn.Module
    """Every weight the reward needs (what offloading moves, what the estimate counts)."""
    batch_size: int = 8

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """[b] rewards of images already on ``device``; differentiable (no ``no_grad``)."""

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """[B] rewards, scoring ``batch_size`` images at a time; a call that runs out of
        GPU memory is scored again with half as many (``scoring_width``)."""

        def score(indices: Tensor) -> Tensor:
            first, end = int(indices[0]), int(indices[-1]) + 1
            chunk = images[first:end].to(self.device)
            return self.score(chunk, prompts[first:end]).float().cpu()

        return torch.cat(self.scoring_width().map(torch.arange(len(images)), score))

    def scoring_width(self) -> NarrowingWidth:
        """How many images a scoring call takes: ``batch_size``, halved for the rest of
        the run each time a call runs out of GPU memory (the trainer logs its notes)."""
        if getattr(self, "_width", None) is None:
            self._width = NarrowingWidth(self.batch_size, "reward.batch_size", "scoring images")
        return self._width

    def device_bytes(self) -> int:
        """Bytes the reward's weights take on the accelerator."""
        from lowvram_ddpo.memory.units import module_bytes

        return module_bytes(self.module)

    def extra_metrics(self) -> dict[str, float]:
        """Per-epoch figures the reward wants logged beside the reward (e.g. BERTScore F1)."""
        return {}

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> ModelReward:
        """The same network with random weights on ``device`` (``meta``: shapes only) for
        the memory benchmark; its rewards are finite but mean nothing."""
        raise NotImplementedError(f"{cls.__name__} has no memory estimate yet")


Factory = Callable[[RewardConfig, torch.dtype], Reward]
_REGISTRY: dict[str, tuple[Factory, str]] = {}


def register_reward(name: str, description: str) -> Callable:
    """Class or factory decorator: ``build_reward(name)`` calls it with (config, dtype)."""

    def decorator(factory: Factory) -> Factory:
        _REGISTRY[name] = (factory, description)
        return factory

    return decorator


def available_rewards() -> dict[str, str]:
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def _factory(name: str) -> Factory:
    if name in _REGISTRY:
        return _REGISTRY[name][0]
    if is_own_reward(name):
        from lowvram_ddpo.rewards.own import OwnReward

        return lambda config, dtype: OwnReward(name)
    raise UserError(
        f"unknown reward '{name}': use one of {', '.join(sorted(_REGISTRY))}, or {OWN_REWARD_HINT}"
    )


def check_reward_names(names: list[str]) -> None:
    """Each name is a listed reward or an own one whose file imports: one-line errors
    before minutes of model loading, not at the first scoring."""
    from lowvram_ddpo.rewards.own import import_own_reward

    for name in names:
        _factory(name)
        if name not in _REGISTRY:
            import_own_reward(name)


def build_reward(
    name: str, config: RewardConfig | None = None, dtype: torch.dtype = torch.float32
) -> Reward:
    config = config if config is not None and config.name == name else RewardConfig(name=name)
    return _factory(name)(config, dtype)


def reward_with_random_weights(
    config: RewardConfig, dtype: torch.dtype, device: str | torch.device = "meta"
) -> ModelReward | None:
    """The reward's network with random weights on ``device``; None for rewards that use
    no network (they are cheap to build for real)."""
    factory = _factory(config.name)
    if isinstance(factory, type) and issubclass(factory, ModelReward):
        return factory.with_random_weights(config, dtype, device)
    return None


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
