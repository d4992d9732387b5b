"""``reward.name = "mix"``: a weighted sum of rewards, ``reward.mix = {aesthetic = 1.0,
pickscore = 0.5}``.

Each component is built as it would be alone (with the run's other ``reward.*``
settings) and scores every image; the mix's own log adds each component's mean
(``reward_<name>_mean``), so a run shows which part of the sum moved. The components'
networks are one module: on the GPU together while scoring, counted together in the
memory estimate.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from lowvram_ddpo.config import RewardConfig, reward_label
from lowvram_ddpo.rewards.base import (
    ModelReward,
    Reward,
    build_reward,
    register_reward,
    reward_with_random_weights,
)


def component_config(config: RewardConfig, name: str) -> RewardConfig:
    return dataclasses.replace(config, name=name, mix={})


@register_reward("mix", "weighted sum of rewards: reward.mix = {aesthetic = 1.0, pickscore = 0.5}")
class MixedReward(ModelReward):
    def __init__(
        self,
        config: RewardConfig,
        dtype: torch.dtype,
        components: dict[str, Reward] | None = None,
    ) -> None:
        self.batch_size = config.batch_size
        self.weights = dict(config.mix)
        self.components = components or {
            name: build_reward(name, component_config(config, name), dtype) for name in self.weights
        }
        self.module = nn.ModuleDict(
            {n: r.module for n, r in self.components.items() if isinstance(r, ModelReward)}
        )
        self.sums = dict.fromkeys(self.weights, 0.0)
        self.count = 0

    @property
    def device(self) -> torch.device:
        """The networks' device; the CPU for a mix of CPU rewards (JPEG)."""
        return next(self.module.parameters(), torch.empty(0)).device

    def score_one(self, name: str, images: Tensor, prompts: list[str]) -> Tensor:
        reward = self.components[name]
        if isinstance(reward, ModelReward):
            return reward.score(images, prompts).float()
        if images.device.type == "meta":  # the memory estimate: CPU rewards take no memory
            return torch.zeros(len(images), device="meta")
        return reward(images.float().cpu(), prompts).to(images.device).float()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        total = torch.zeros(len(images), device=images.device)
        sums = {}  # counted once every part has scored: a call that runs out of memory
        for name, weight in self.weights.items():  # midway is scored again, narrower
            values = self.score_one(name, images, prompts)
            if values.device.type != "meta":
                sums[name] = values.detach().sum().item()
            total = total + weight * values
        for name, value in sums.items():
            self.sums[name] += value
        self.count += len(images)
        return total

    def extra_metrics(self) -> dict[str, float]:
        """Each component's mean over the images scored since the last call."""
        count, self.count = max(self.count, 1), 0
        means = {
            f"reward_{reward_label(name)}_mean": total / count for name, total in self.sums.items()
        }
        self.sums = dict.fromkeys(self.weights, 0.0)
        return means

    @classmethod
    def with_random_weights(
        cls, config: RewardConfig, dtype: torch.dtype, device: str | torch.device
    ) -> MixedReward:
        components = {}
        for name in config.mix:
            part = component_config(config, name)
            components[name] = reward_with_random_weights(part, dtype, device) or build_reward(
                name, part, dtype
            )
        return cls(config, dtype, components)
