"""Per-prompt reward normalisation with a running buffer, as in DDPO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowvram_ddpo.algorithms import PerPromptStatTracker, clip_advantages, group_advantages


def test_batch_statistics_until_a_prompt_has_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    mean, std = rewards.double().mean().item(), rewards.double().std(unbiased=False).item()
    assert adv.tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in rewards.tolist()])


def test_per_prompt_statistics_once_the_buffer_is_full_enough():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 100.0, 300.0]))
    adv = tracker.update(["a", "b"], torch.tensor([2.0, 200.0]))
    # "a" buffer: 1, 3, 2 -> mean 2; "b": 100, 300, 200 -> mean 200: both advantages 0
    assert adv.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    adv = tracker.update(["a"], torch.tensor([4.0]))
    buffer = [1.0, 3.0, 2.0, 4.0]
    assert adv.item() == pytest.approx((4.0 - np.mean(buffer)) / (np.std(buffer) + 1e-6))


def test_buffer_is_bounded_and_state_round_trips():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a"] * 5, torch.arange(5, dtype=torch.float32))
    assert list(tracker.buffers["a"]) == [2.0, 3.0, 4.0]
    clone = PerPromptStatTracker(buffer_size=3, min_count=1)
    clone.load_state_dict(tracker.state_dict())
    new = torch.tensor([7.0])
    assert clone.update(["a"], new).item() == pytest.approx(tracker.update(["a"], new).item())


def test_global_normalisation_when_per_prompt_is_off():
    tracker = PerPromptStatTracker(per_prompt=False)
    adv = tracker.update(["a", "b"], torch.tensor([0.0, 2.0]))
    assert adv.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert tracker.buffers == {}


def test_advantage_clipping():
    assert clip_advantages(torch.tensor([-9.0, 0.5, 9.0]), 5.0).tolist() == [-5.0, 0.5, 5.0]


def test_grpo_normalises_within_each_group():
    # group "a": rewards 1, 3 (mean 2, std 1); group "b": 10, 10, 16 (mean 12, std sqrt(8))
    prompts = ["a", "b", "a", "b", "b"]
    rewards = torch.tensor([1.0, 10.0, 3.0, 10.0, 16.0])
    adv = group_advantages(prompts, rewards)
    b_std = 8**0.5 + 1e-4
    assert adv.tolist() == pytest.approx(
        [-1 / (1 + 1e-4), -2 / b_std, 1 / (1 + 1e-4), -2 / b_std, 4 / b_std], rel=1e-4
    )


def test_grpo_with_global_std_keeps_a_flat_group_small():
    # Flow-GRPO's global_std: one std for all (here ~3.8), so the near-equal group "b" gets
    # small advantages instead of +-1
    prompts = ["a", "a", "b", "b"]
    rewards = torch.tensor([0.0, 10.0, 5.0, 5.2])
    spread = rewards.double().std(unbiased=False).item() + 1e-4
    adv = group_advantages(prompts, rewards, global_std=True)
    assert adv.tolist() == pytest.approx([-5 / spread, 5 / spread, -0.1 / spread, 0.1 / spread])
    assert group_advantages(prompts, rewards)[2:].tolist() == pytest.approx([-1.0, 1.0], abs=2e-3)
