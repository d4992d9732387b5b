"""DiffusionNFT: the loss against a hand-computed case, the optimality mapping and the
sampling policy's weights (swapped in, following the trained ones)."""

from __future__ import annotations

import pytest
import torch

from lowvram_ddpo.algorithms.nft import (
    SamplingWeights,
    nft_objective,
    old_policy_decay,
    optimality,
)
from lowvram_ddpo.errors import UserError


def test_optimality_maps_advantages_to_0_1():
    r = optimality(torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0, 9.0]), adv_clip_max=5.0)
    assert r.tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_nft_objective_matches_a_hand_computed_case():
    # one sample, two latent dims; noise level 0.5, beta 1, r = 0.75, A_max 5
    x0 = torch.tensor([[1.0, -1.0]])
    noisy = torch.tensor([[0.5, 0.0]])
    v = torch.tensor([[-1.0, 2.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 1.0]])
    sigma = torch.tensor([[0.5]])
    loss, metrics = nft_objective(v, v_old, noisy, x0, sigma, torch.tensor([0.75]), 1.0, 5.0)
    # v+ = v = (-1, 2): x0+ = noisy - 0.5 v+ = (1.0, -1.0): error (0, 0) -> floor 1e-5
    # v- = 2 v_old - v = (1, 0): x0- = (0.0, 0.0): error (-1, 1): mean sq 1, mean abs 1 -> 1
    # loss = 5 * (0.75 * 0 / 1e-5 + 0.25 * 1 / 1) / 1 = 1.25
    assert float(loss.detach()) == pytest.approx(1.25)
    assert float(metrics["nft_positive"]) == 0.0 and float(metrics["nft_negative"]) == 1.0
    loss.backward()
    # d/dv of 5 * 0.25 * mean((noisy - 0.5 (2 v_old - v) - x0)^2) / 1 (weight detached):
    # x0- - x0 = (-1, 1); d x0-/dv = +0.5: 5 * 0.25 * 2 * (-1, 1) * 0.5 / 2 = (-0.625, 0.625)
    torch.testing.assert_close(v.grad, torch.tensor([[-0.625, 0.625]]))


def test_beta_mixes_the_implicit_policies_with_the_sampling_one():
    x0, noisy, sigma = torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1.0]])
    v_old, v = torch.full((1, 3), 0.5), torch.full((1, 3), 1.5)
    # beta 0.5: v+ = 1.0 -> x0+ = 0 (perfect); v- = 0.0 -> x0- = 1 (error 1)
    good, _ = nft_objective(v, v_old, noisy, x0, sigma, torch.tensor([1.0]), 0.5, 1.0)
    bad, _ = nft_objective(v, v_old, noisy, x0, sigma, torch.tensor([0.0]), 0.5, 1.0)
    assert float(good) == pytest.approx(0.0, abs=1e-6)
    assert float(bad) == pytest.approx(1.0 / 0.5)


def test_sampling_weights_swap_in_and_back_and_follow_the_trained_ones():
    layer = torch.nn.Linear(2, 2, bias=False)
    params = list(layer.parameters())
    weights = SamplingWeights(params)
    with torch.no_grad():
        layer.weight.add_(1.0)  # training moves the live weights
    trained = layer.weight.detach().clone()
    with weights.in_use():
        torch.testing.assert_close(layer.weight, trained - 1.0)  # the sampling policy's
    torch.testing.assert_close(layer.weight, trained)  # and back
    weights.follow(decay=0.25)
    torch.testing.assert_close(weights.weights[0], 0.25 * (trained - 1.0) + 0.75 * trained)
    restored = SamplingWeights(params)
    restored.load(weights.state())
    torch.testing.assert_close(restored.weights[0], weights.weights[0])
    other = SamplingWeights(list(torch.nn.Linear(3, 2, bias=False).parameters()))
    with pytest.raises(UserError, match="do not match this LoRA"):
        other.load(weights.state())


def test_the_sampling_policy_lags_more_as_training_goes_on():
    assert old_policy_decay(0) == 0.0
    assert old_policy_decay(100) == pytest.approx(0.1)
    assert old_policy_decay(10_000) == 0.5
