"""The four objectives against hand-computed values and PPO's clipping behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from lowvram_ddpo.algorithms import (
    ppo_clip_loss,
    rwr_weights,
    score_function_loss,
    sparse_rwr_weights,
    weighted_denoising_loss,
)

EPS = 1e-4


def _grad_of_ppo(log_ratio: float, advantage: float) -> float:
    log_prob = torch.tensor([log_ratio], requires_grad=True)
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(1), torch.tensor([advantage]), EPS)
    loss.backward()
    return log_prob.grad.item()


@pytest.mark.parametrize(
    ("log_ratio", "advantage"),
    [(math.log(1 + 10 * EPS), 1.0), (math.log(1 - 10 * EPS), -1.0)],
)
def test_ppo_gradient_is_zero_once_clipped_in_the_advantage_direction(log_ratio, advantage):
    # ratio already pushed past the clip range in the direction the advantage wants: no push
    assert _grad_of_ppo(log_ratio, advantage) == 0.0


@pytest.mark.parametrize(
    ("log_ratio", "advantage"),
    [(math.log(1 - 10 * EPS), 1.0), (math.log(1 + 10 * EPS), -1.0), (0.0, 1.0), (0.0, -1.0)],
)
def test_ppo_gradient_survives_when_the_ratio_moved_against_the_advantage(log_ratio, advantage):
    grad = _grad_of_ppo(log_ratio, advantage)
    ratio = math.exp(log_ratio)
    # d/dlogp of -A * ratio is -A * ratio: gradient descent raises logp when A > 0
    assert grad == pytest.approx(-advantage * ratio, rel=1e-5)


def test_ppo_loss_value_and_metrics():
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    adv = torch.tensor([2.0, 1.0, 1.0])
    loss, metrics = ppo_clip_loss(log_prob, torch.zeros(3), adv, 0.2)
    # per sample max(-A r, -A clip(r)): -2, max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-2.0 - 1.2 - 0.5) / 3)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert metrics["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_score_function_loss_value_and_gradient():
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -3.0])
    loss, _ = score_function_loss(log_prob, log_prob.detach(), adv)
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + -3.0 * -2.0) / 2)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-0.5, 1.5])


def test_rwr_weights_are_a_scaled_softmax():
    adv = torch.tensor([0.0, 1.0, 2.0])
    weights = rwr_weights(adv, beta=0.5)
    z = [math.exp(0.5 * a) for a in (0.0, 1.0, 2.0)]
    assert weights.tolist() == pytest.approx([3 * v / sum(z) for v in z], rel=1e-6)
    assert weights.mean().item() == pytest.approx(1.0)


def test_sparse_rwr_keeps_the_top_share_only():
    adv = torch.arange(10, dtype=torch.float32)  # 0..9
    weights = sparse_rwr_weights(adv, percentile=80.0)  # threshold 7.2 -> keep 8 and 9
    assert weights.tolist() == pytest.approx([0.0] * 8 + [5.0, 5.0])
    assert weights.mean().item() == pytest.approx(1.0)


def test_weighted_denoising_loss_value():
    prediction = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    weights = torch.tensor([2.0, 0.0])
    loss, _ = weighted_denoising_loss(prediction, target, weights)
    # per-sample MSE: 1.0 and 2.0; weighted mean: (2*1 + 0*2) / 2
    assert loss.item() == pytest.approx(1.0)
