"""Advantages: rewards normalised per prompt with a running buffer (DDPO), or within
each group of images of one prompt sampled together (GRPO)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

STD_EPS = 1e-6
GROUP_STD_EPS = 1e-4
"""Flow-GRPO's: a group of near-equal rewards is not blown up past ~1e4."""


class PerPromptStatTracker:
    """Normalise each reward by the mean/std of recent rewards for the same prompt.

    Until a prompt has ``min_count`` rewards in its buffer, the statistics of the
    whole batch are used instead. Buffers persist across epochs (and checkpoints).
    With ``per_prompt=False`` every reward is normalised by the batch statistics.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, per_prompt: bool = True) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.per_prompt = per_prompt
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Record ``rewards`` and return their advantages ([B] float32)."""
        values = rewards.double().numpy()
        batch_mean, batch_std = values.mean(), values.std() + STD_EPS
        if not self.per_prompt:
            return torch.from_numpy((values - batch_mean) / batch_std).float()
        names = np.array(prompts, dtype=object)
        advantages = np.empty_like(values)
        for prompt in dict.fromkeys(prompts):
            mask = names == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + STD_EPS
            advantages[mask] = (values[mask] - mean) / std
        return torch.from_numpy(advantages).float()

    def state_dict(self) -> dict:
        return {"buffers": {prompt: list(buf) for prompt, buf in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }


def group_advantages(prompts: list[str], rewards: Tensor, global_std: bool = False) -> Tensor:
    """GRPO's advantages: each reward minus the mean of its prompt's rewards this epoch,
    over their std (or, ``global_std``, over the std of every reward), as Flow-GRPO's
    ``PerPromptStatTracker(global_std)`` computes them ([B] float32)."""
    values = rewards.double().numpy()
    names = np.array(prompts, dtype=object)
    advantages = np.empty_like(values)
    spread = values.std() + GROUP_STD_EPS
    for prompt in dict.fromkeys(prompts):
        mask = names == prompt
        group = values[mask]
        std = spread if global_std else group.std() + GROUP_STD_EPS
        advantages[mask] = (group - group.mean()) / std
    return torch.from_numpy(advantages).float()


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    return advantages.clamp(-max_abs, max_abs)
