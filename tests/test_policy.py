"""The DDIM step as a Gaussian policy: exact log-probs, the right moments, exact replay."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tiny import assert_replay_gives_ratio_one

from lowvram_ddpo.policy import Conditioning, DDIMPolicy, GaussianStep, gaussian_log_prob
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.text_encoding import encode_negative, encode_prompts


def _cond(pipe, prompts, scale=5.0):
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).expand_as(embeds)
    return Conditioning(embeds, negative, scale)


def test_log_prob_equals_torch_normal():
    torch.manual_seed(0)
    mean = torch.randn(3, 4, 5, 5)
    std = torch.rand(3, 1, 1, 1) + 0.1
    x = torch.randn(3, 4, 5, 5)
    expected = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.allclose(gaussian_log_prob(x, mean, std), expected, atol=1e-6)
    step = GaussianStep(mean=mean, std=std, denoised=mean)
    assert torch.allclose(step.log_prob(x), expected, atol=1e-6)


def test_ddim_step_log_prob_on_a_real_unet(tiny_pipeline):
    pipe = tiny_pipeline
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=5, eta=1.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = policy.timesteps()[2].repeat(2)
    with torch.no_grad():
        step = policy(pipe.unet, latents, t, _cond(pipe, ["a cat", "a dog"]))
    x_prev = step.sample(torch.Generator().manual_seed(2))
    normal = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    expected = normal.log_prob(x_prev).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob(x_prev), expected, atol=1e-5)


def test_ddim_mean_and_std_match_diffusers_scheduler(tiny_pipeline):
    """With the noise set to zero, diffusers' DDIM step lands on our mean; its std is ours."""
    pipe = tiny_pipeline
    eta = 0.7
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=10, eta=eta)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = _cond(pipe, ["a cat"], scale=1.0)
    for t in scheduler.timesteps[[0, 4, 9]]:
        with torch.no_grad():
            step = policy(pipe.unet, latents, t.repeat(1), cond)
            eps = pipe.unet(latents, t, encoder_hidden_states=cond.prompt_embeds).sample
        zero = torch.zeros_like(latents)
        ref = scheduler.step(eps, t, latents, eta=eta, variance_noise=zero).prev_sample
        assert torch.allclose(step.mean, ref, atol=1e-5)
        prev_t = t - scheduler.config.num_train_timesteps // 10
        ref_std = eta * scheduler._get_variance(t, prev_t) ** 0.5
        assert torch.allclose(step.std.flatten(), ref_std.float().flatten(), rtol=1e-4)


def test_sampled_moments_match_the_formula():
    torch.manual_seed(0)
    mean = torch.full((20000, 1, 2, 2), 0.3)
    std = torch.full((20000, 1, 1, 1), 0.5)
    draws = GaussianStep(mean, std, mean).sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 0.3) < 0.01
    assert abs(draws.std().item() - 0.5) < 0.01


def test_replay_of_a_stored_trajectory_gives_ratio_one(tiny_pipeline):
    """Re-scoring the stored actions under unchanged weights (the training path, with a
    different batch composition) reproduces the stored log-probs."""
    pipe = tiny_pipeline
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=4, eta=1.0)
    negative = encode_negative(pipe, "")
    with torch.no_grad():
        samples = sample_trajectories(
            pipe,
            pipe.unet,
            policy,
            ["a cat", "a dog", "a fox"],
            negative,
            5.0,
            32,
            torch.Generator().manual_seed(0),
        )
    assert samples.latents.shape == (3, 5, 4, 8, 8)
    assert samples.log_probs.shape == (3, 4)
    assert samples.images.shape == (3, 3, 32, 32)
    assert_replay_gives_ratio_one(pipe.unet, policy, samples, negative, 5.0)
    # and directly: every step's recomputed log-prob within 1e-5 of the stored one
    for k in range(4):
        cond = Conditioning.of(samples.text(), negative, 5.0)
        with torch.no_grad():
            step = policy(pipe.unet, samples.latents[:, k], samples.timesteps[[k] * 3], cond)
        replayed = step.log_prob(samples.latents[:, k + 1])
        assert (replayed - samples.log_probs[:, k]).abs().max().item() < 1e-5
