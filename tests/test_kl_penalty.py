"""The KL guard against reward hacking: the distance of each trained denoising step to the
base model's (the same UNet with its LoRA off): the closed form, zero at the start,
positive once the adapter moved, and its gradient pulls the adapter back."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lowvram_ddpo.algorithms.steps import MicroBatch, policy_gradient_loss
from lowvram_ddpo.config import load_preset, validate
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import attach_lora
from lowvram_ddpo.policy import DDIMPolicy
from lowvram_ddpo.policy.base import GaussianStep
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.text_encoding import encode_negative

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_the_step_kl_is_the_gaussian_kl_averaged_over_dims():
    g = torch.Generator().manual_seed(0)
    mean, other = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    std, other_std = torch.tensor([0.5, 0.2]).view(2, 1, 1, 1), torch.tensor([0.4, 0.3])
    other_std = other_std.view(2, 1, 1, 1)
    ours = GaussianStep(mean, std, mean).kl_to(GaussianStep(other, other_std, other))
    full = kl_divergence(
        Normal(mean, std.expand_as(mean)), Normal(other, other_std.expand_as(mean))
    )
    assert torch.allclose(ours, full.mean(dim=(1, 2, 3)), atol=1e-6)
    same = GaussianStep(mean, std, mean).kl_to(GaussianStep(other, std, other))
    closed = ((mean - other) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3))
    assert torch.allclose(same, closed, atol=1e-6)


def _setup(pipe):  # noqa: ANN001, ANN202
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=3, eta=1.0)
    negative = encode_negative(pipe, "")
    with torch.no_grad():
        samples = sample_trajectories(
            pipe, pipe.unet, policy, ["a cat", "a dog"], negative, 5.0, 32,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
    params = attach_lora(pipe.unet, 4, 4.0, TARGETS)
    batch = MicroBatch(samples=torch.arange(2), steps=torch.tensor([0, 1]))
    return policy, negative, samples, params, batch


def _loss(pipe, policy, negative, samples, batch, kl_coef: float = 1.0):  # noqa: ANN001, ANN202
    zero_advantages = torch.zeros(2)  # only the penalty pulls
    return policy_gradient_loss(
        "ddpo-is", pipe.unet, policy, samples, batch, zero_advantages, negative, 5.0, 1e-4,
        kl_coef,
    )  # fmt: skip


def test_kl_to_base_is_zero_at_the_start_positive_after_and_its_gradient_pulls_back(
    tiny_pipeline,
):
    pipe = tiny_pipeline
    policy, negative, samples, params, batch = _setup(pipe)
    _, metrics = _loss(pipe, policy, negative, samples, batch)
    assert metrics["kl_to_base"].item() == 0.0  # a fresh LoRA (B = 0) is the base model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    loss, metrics = _loss(pipe, policy, negative, samples, batch)
    moved = metrics["kl_to_base"].item()
    assert moved > 0 and loss.item() == pytest.approx(moved, rel=1e-5)
    assert pipe.unet.active_adapters()  # the adapters are back on after the base step
    optimizer = torch.optim.SGD(params, lr=1e-3)
    for _ in range(3):
        loss, _ = _loss(pipe, policy, negative, samples, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, metrics = _loss(pipe, policy, negative, samples, batch)
    assert metrics["kl_to_base"].item() < 0.95 * moved  # descending it goes back to the base
    _, off = _loss(pipe, policy, negative, samples, batch, kl_coef=0.0)
    assert "kl_to_base" not in off


def test_kl_coef_needs_ddpo_and_lora():
    config = load_preset("incompressibility")
    config.train.kl_coef = 0.1
    validate(config)
    config.train.algorithm = "rwr"
    with pytest.raises(UserError, match="needs ddpo-is, ddpo-sf, grpo or nft"):
        validate(config)
    config.train.algorithm = "ddpo-is"
    config.model.lora_rank = 0
    with pytest.raises(UserError, match="needs LoRA"):
        validate(config)
