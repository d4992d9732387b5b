"""Flow-GRPO's SDE as a Gaussian policy, on a tiny SD3 transformer (random weights)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny import build_tiny_sd3_pipeline

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.policy import (
    Conditioning,
    FlowCPSPolicy,
    FlowSDEPolicy,
    build_policy,
    sampler_for,
)
from lowvram_ddpo.policy.flow_sde import flow_model_output, flow_schedule
from lowvram_ddpo.rollout import rollout
from lowvram_ddpo.text_encoding import TextEmbeds

STEPS = 6


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny_sd3_pipeline()
    prompt, _, pooled, _ = pipe.encode_prompt(
        ["a red circle", "a blue square"], None, None, do_classifier_free_guidance=False,
        max_sequence_length=8,
    )  # fmt: skip
    negative, _, negative_pooled, _ = pipe.encode_prompt(
        [""], None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    cond = Conditioning.of(
        TextEmbeds(prompt, pooled), TextEmbeds(negative, negative_pooled), guidance_scale=3.0
    )
    return pipe, cond


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_flow_models_get_the_flow_policy_by_default(sd3):
    pipe, _ = sd3
    config = pipe.scheduler.config
    assert sampler_for("auto", config, pipe.transformer.config) == "flow-sde"
    assert isinstance(build_policy("auto", config, {}, STEPS, 1.0, 0.5), FlowSDEPolicy)


def test_the_schedule_is_diffusers_shifted_one(sd3):
    pipe, _ = sd3
    timesteps, sigmas = flow_schedule(pipe.scheduler.config, STEPS)
    reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(STEPS)
    assert torch.equal(timesteps, reference.timesteps)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == STEPS + 1
    # shift 3: sigma = 3 s / (1 + 2 s) of the linear schedule, so the middle sits high
    assert sigmas[STEPS // 2] > 0.6


def test_at_a_vanishing_noise_level_each_step_is_diffusers_euler_step(sd3):
    pipe, cond = sd3
    policy = FlowSDEPolicy(pipe.scheduler.config, STEPS, noise_level=1e-7)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    x = _latents()
    with torch.no_grad():
        for t in policy.timesteps():
            step = policy(pipe.transformer, x, t.expand(2), cond)
            velocity = flow_model_output(pipe.transformer, x, t.expand(2), cond)
            euler = scheduler.step(velocity, t, x).prev_sample
            torch.testing.assert_close(step.mean, euler, rtol=0, atol=1e-5)
            assert float(step.std.max()) < 1e-6
            x = euler


def test_step_moments_follow_flow_grpo_formulas(sd3):
    pipe, cond = sd3
    a = 0.7
    policy = FlowSDEPolicy(pipe.scheduler.config, STEPS, noise_level=a)
    _, sigmas = flow_schedule(pipe.scheduler.config, STEPS)
    timesteps = policy.timesteps()
    x = _latents(1)
    with torch.no_grad():
        for k in (0, 2, STEPS - 1):  # the first step (sigma = 1), a middle one, the last
            sigma, nxt = float(sigmas[k]), float(sigmas[k + 1])
            dt = nxt - sigma
            inner = float(sigmas[1]) if sigma == 1.0 else sigma
            s_t = a * math.sqrt(sigma / (1 - inner))
            v = flow_model_output(pipe.transformer, x, timesteps[k].expand(2), cond)
            mean = (
                x * (1 + s_t**2 / (2 * sigma) * dt)
                + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
            )
            step = policy(pipe.transformer, x, timesteps[k].expand(2), cond)
            torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-5)
            assert float(step.std[0]) == pytest.approx(s_t * math.sqrt(-dt), rel=1e-6)
            torch.testing.assert_close(step.denoised, x - sigma * v, rtol=1e-5, atol=1e-5)


def test_log_prob_is_torch_normal_averaged_over_dims(sd3):
    pipe, cond = sd3
    policy = FlowSDEPolicy(pipe.scheduler.config, STEPS)
    x = _latents(2)
    with torch.no_grad():
        step = policy(pipe.transformer, x, policy.timesteps()[1].expand(2), cond)
    x_next = step.sample(torch.Generator().manual_seed(3))
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    torch.testing.assert_close(
        step.log_prob(x_next), expected.log_prob(x_next).mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6
    )


def test_guidance_doubles_the_batch_as_two_passes_would(sd3):
    pipe, cond = sd3
    x, t = _latents(4), torch.full((2,), 500.0)
    hidden, pooled = cond.embeddings()
    negative, negative_pooled = cond.negative_embeds, cond.negative_pooled

    def velocity(h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=h, pooled_projections=p
        ).sample

    with torch.no_grad():
        guided = flow_model_output(pipe.transformer, x, t, cond)
        uncond, text = velocity(negative, negative_pooled), velocity(hidden, pooled)
    torch.testing.assert_close(guided, uncond + 3.0 * (text - uncond), rtol=1e-5, atol=1e-5)


def test_replaying_a_rollout_gives_ratio_one(sd3):
    """What DDPO's clip range needs: the training pass recomputes the sampled log-probs."""
    pipe, cond = sd3
    policy = FlowSDEPolicy(pipe.scheduler.config, STEPS)
    latents, log_probs, timesteps, _, _ = rollout(
        pipe.transformer, policy, cond, _latents(5), torch.Generator().manual_seed(6)
    )
    shuffled = torch.randperm(STEPS, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for k in shuffled.tolist():  # steps in any order: looked up by timestep
            step = policy(pipe.transformer, latents[:, k], timesteps[k].expand(2), cond)
            replayed = step.log_prob(latents[:, k + 1])
            assert float((replayed - log_probs[:, k]).abs().max()) < 1e-5


def test_a_zero_noise_level_is_refused(sd3):
    pipe, _ = sd3
    with pytest.raises(UserError, match="noise_level must be > 0"):
        FlowSDEPolicy(pipe.scheduler.config, STEPS, noise_level=0.0)


def test_flow_grpo_fast_samples_only_its_window_and_follows_the_ode_elsewhere(sd3):
    pipe, cond = sd3
    steps = 8
    policy = FlowSDEPolicy(pipe.scheduler.config, steps, window=2)
    starts = {policy.stochastic_steps(torch.Generator().manual_seed(s)).start for s in range(40)}
    assert starts == {0, 1, 2}  # uniform over [0, T // 2 - window]
    latents, log_probs, timesteps, _, window = rollout(
        pipe.transformer, policy, cond, _latents(8), torch.Generator().manual_seed(3)
    )
    assert len(window) == 2
    euler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler.set_timesteps(steps)
    with torch.no_grad():
        for k in range(steps):
            x, t = latents[:, k], timesteps[k].expand(2)
            if k in window:  # sampled: its log-prob replays
                step = policy(pipe.transformer, x, t, cond)
                replayed = step.log_prob(latents[:, k + 1])
                assert float((replayed - log_probs[:, k]).abs().max()) < 1e-5
            else:  # the ODE: diffusers' Euler step, no log-prob
                velocity = flow_model_output(pipe.transformer, x, t, cond)
                dt = euler.sigmas[k + 1] - euler.sigmas[k]  # diffusers' Euler step, by hand
                expected = x + dt * velocity  # (its step() counts calls; here one is skipped)
                torch.testing.assert_close(latents[:, k + 1], expected, rtol=1e-5, atol=1e-5)
                assert float(log_probs[:, k].abs().max()) == 0.0


def test_a_sampler_that_does_not_fit_the_model_is_a_clear_error(sd3):
    from diffusers import DDIMScheduler

    pipe, _ = sd3
    with pytest.raises(UserError, match="does not fit a flow-matching model"):
        build_policy("ddim", pipe.scheduler.config, {}, STEPS, 1.0)
    with pytest.raises(UserError, match="does not fit a diffusion"):
        build_policy("flow-sde", DDIMScheduler().config, {}, STEPS, 1.0)


def test_images_people_look_at_are_drawn_with_the_ode(sd3):
    """Grids, evaluation and `sample` use the Euler sampler diffusers' SD3 pipeline runs,
    not the training SDE."""
    pipe, cond = sd3
    viewing = FlowSDEPolicy(pipe.scheduler.config, STEPS, noise_level=0.7).for_viewing()
    latents, _, timesteps, final, sampled = rollout(
        pipe.transformer, viewing, cond, _latents(9), torch.Generator().manual_seed(1)
    )
    assert len(sampled) == 0
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    x = _latents(9)
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = flow_model_output(pipe.transformer, x, t.expand(2), cond)
            x = scheduler.step(velocity, t, x).prev_sample
    torch.testing.assert_close(final, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CPS


def test_cps_moments_follow_flow_grpo_formulas(sd3):
    pipe, cond = sd3
    a = 0.8
    policy = build_policy("flow-cps", pipe.scheduler.config, {}, STEPS, 1.0, a)
    assert isinstance(policy, FlowCPSPolicy)
    _, sigmas = flow_schedule(pipe.scheduler.config, STEPS)
    timesteps = policy.timesteps()
    x = _latents(1)
    with torch.no_grad():
        for k in (0, 2, STEPS - 1):
            sigma, nxt = float(sigmas[k]), float(sigmas[k + 1])
            v = flow_model_output(pipe.transformer, x, timesteps[k].expand(2), cond)
            std = nxt * math.sin(a * math.pi / 2)
            x0, x1 = x - sigma * v, x + (1 - sigma) * v
            mean = x0 * (1 - nxt) + x1 * math.sqrt(nxt**2 - std**2)
            step = policy(pipe.transformer, x, timesteps[k].expand(2), cond)
            torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-5)
            assert float(step.std[0]) == pytest.approx(std, rel=1e-6, abs=1e-9)


def test_cps_keeps_the_flows_coefficients_exactly():
    """With a perfect velocity (v = noise - x0 of x = (1 - s) x0 + s noise), the next
    latent is (1 - s') x0 + s' (cos noise + sin fresh noise): the flow's own marginal."""
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    a = 0.8
    policy = FlowCPSPolicy(config, STEPS, noise_level=a)
    _, sigmas = flow_schedule(config, STEPS)
    sigma, x_coef, v_coef, std = policy.step_coefficients(policy.timesteps())
    sigma, x_coef, v_coef, std = (c.flatten().double() for c in (sigma, x_coef, v_coef, std))
    nxt = sigmas[1:]
    # x coef * ((1 - s) x0 + s e) + v coef * (e - x0)
    torch.testing.assert_close(x_coef * (1 - sigma) - v_coef, 1 - nxt, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        x_coef * sigma + v_coef, nxt * math.cos(a * math.pi / 2), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(std, nxt * math.sin(a * math.pi / 2), rtol=0, atol=1e-6)


def test_cps_at_a_vanishing_noise_level_is_the_euler_step_and_its_last_step_is_sharp(sd3):
    pipe, cond = sd3
    euler = FlowSDEPolicy(pipe.scheduler.config, STEPS).for_viewing()
    cps = FlowCPSPolicy(pipe.scheduler.config, STEPS, noise_level=1e-7)
    x = _latents(3)
    with torch.no_grad():
        ode, *_ = rollout(pipe.transformer, euler, cond, x, torch.Generator().manual_seed(0))
        near, log_probs, *_, stochastic = rollout(
            pipe.transformer, cps, cond, x, torch.Generator().manual_seed(0)
        )
    torch.testing.assert_close(near, ode, rtol=0, atol=1e-4)
    assert list(stochastic) == list(range(STEPS - 1))  # the last step (std 0) samples nothing
    assert torch.isfinite(log_probs).all() and (log_probs[:, -1] == 0).all()


def test_cps_rollouts_replay_with_ratio_one_and_noise_levels_above_one_are_refused(sd3):
    pipe, cond = sd3
    policy = FlowCPSPolicy(pipe.scheduler.config, STEPS, noise_level=0.8)
    with torch.no_grad():
        latents, log_probs, timesteps, _, stochastic = rollout(
            pipe.transformer, policy, cond, _latents(4), torch.Generator().manual_seed(1)
        )
        for k in stochastic:
            step = policy(pipe.transformer, latents[:, k], timesteps[k].expand(2), cond)
            assert (step.log_prob(latents[:, k + 1]) - log_probs[:, k]).abs().max() < 1e-5
    with pytest.raises(UserError, match=r"in \(0, 1\] for the cps sampler"):
        FlowCPSPolicy(pipe.scheduler.config, STEPS, noise_level=1.5)


def test_a_size_dependent_shift_is_refused_for_models_other_than_flux2(sd3):
    """FLUX.2's shift (its empirical mu) is not SD 3's (calculate_shift): an SD 3 folder
    whose scheduler shifts by size gets a clear error, not FLUX.2's schedule."""
    pipe, _ = sd3
    config = dict(pipe.scheduler.config, use_dynamic_shifting=True)
    with pytest.raises(UserError, match="supported for FLUX.2-klein only"):
        build_policy("auto", config, pipe.transformer.config, STEPS, 1.0, image_tokens=64)


def test_cps_samples_only_its_window_when_it_has_one(sd3):
    pipe, cond = sd3
    policy = FlowCPSPolicy(pipe.scheduler.config, STEPS, noise_level=0.8, window=2)
    latents, log_probs, _, _, stochastic = rollout(
        pipe.transformer, policy, cond, _latents(5), torch.Generator().manual_seed(2)
    )
    assert len(stochastic) == 2 and stochastic.stop <= STEPS // 2
    outside = [k for k in range(STEPS) if k not in stochastic]
    assert (log_probs[:, outside] == 0).all() and (log_probs[:, list(stochastic)] != 0).all()
