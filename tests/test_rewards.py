"""JPEG rewards and the reward registry."""

from __future__ import annotations

import pytest
import torch

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rewards import available_rewards, build_reward, check_rewards


def _flat_and_noise() -> torch.Tensor:
    flat = torch.full((3, 64, 64), 0.5)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.stack([flat, noise])


def test_jpeg_rewards_rank_flat_as_more_compressible_than_noise():
    images = _flat_and_noise()
    compress = build_reward("jpeg_compressibility")(images, ["x", "y"])
    incompress = build_reward("jpeg_incompressibility")(images, ["x", "y"])
    assert compress[0] > compress[1]
    assert incompress[1] > incompress[0]
    assert torch.allclose(compress, -incompress)
    # sizes are in kB: a 64x64 noise JPEG at quality 95 is several kB, a flat one well under 1
    assert incompress[1] > 3.0 and incompress[0] < 1.0


def test_registry_lists_and_rejects():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        build_reward("nope")


def test_nan_rewards_are_refused_with_a_clear_message():
    with pytest.raises(UserError, match="NaN"):
        check_rewards(torch.tensor([1.0, float("nan")]), 2, "r")
    with pytest.raises(UserError, match="returned 1 values for 2 images"):
        check_rewards(torch.tensor([1.0]), 2, "r")
