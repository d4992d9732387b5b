"""The consistency-model policy step (RLCM) against diffusers' LCMScheduler, and the
pocket LCM through the trainer's loading code."""

from __future__ import annotations

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import POCKET_DIR, load_pipeline
from lowvram_ddpo.policy import Conditioning, LCMPolicy, build_policy, gaussian_log_prob
from lowvram_ddpo.policy.lcm import guidance_embedding, rlcm_timesteps
from lowvram_ddpo.text_encoding import encode_prompts

pytestmark = pytest.mark.skipif(
    not (POCKET_DIR / "pocket-lcm" / "model_index.json").is_file(), reason="pocket-lcm not built"
)


def test_rlcm_schedule():
    assert rlcm_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    assert rlcm_timesteps(4).tolist() == [999, 759, 519, 279]
    assert rlcm_timesteps(2).tolist() == [999, 499]
    with pytest.raises(UserError, match="2 to 50 steps"):
        LCMPolicy({"num_train_timesteps": 1000}, 1)  # one step would be deterministic


@pytest.fixture(scope="module")
def pocket_lcm():
    return load_pipeline("pocket-lcm")  # the same loading code as any model


def test_pocket_lcm_loads_and_gets_the_lcm_policy(pocket_lcm):
    assert isinstance(pocket_lcm.scheduler, LCMScheduler)
    assert pocket_lcm.unet.config.time_cond_proj_dim == 256
    policy = build_policy(
        "auto", pocket_lcm.scheduler.config, pocket_lcm.unet.config, num_steps=4, eta=1.0
    )
    assert isinstance(policy, LCMPolicy)


def test_guidance_embedding_is_the_pipelines():
    w = torch.tensor([4.0, 7.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, 256)
    torch.testing.assert_close(guidance_embedding(w, 256), expected)


def test_step_matches_diffusers_lcm_scheduler(pocket_lcm):
    pipe = pocket_lcm
    policy = LCMPolicy(pipe.scheduler.config, num_steps=4)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(timesteps=policy.timesteps().tolist())
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a large red circle", "a cross"])
    cond = Conditioning(embeds, None, guidance_scale=6.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    w_embedding = guidance_embedding(torch.full((2,), 5.0), 256)
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            step = policy(pipe.unet, x, t.repeat(2), cond)
            eps = pipe.unet(
                x, t, encoder_hidden_states=embeds, timestep_cond=w_embedding
            ).sample.float()
            reference = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(index))
            torch.testing.assert_close(step.denoised, reference.denoised, rtol=1e-4, atol=1e-4)
            if index < 3:  # diffusers re-noises to the next level with that generator's draw
                z = torch.randn(x.shape, generator=torch.Generator().manual_seed(index))
                torch.testing.assert_close(
                    step.mean + step.std * z, reference.prev_sample, rtol=1e-4, atol=1e-4
                )
            else:  # RLCM also noises the last step (at its own level); diffusers does not
                abar = scheduler.alphas_cumprod[t]
                torch.testing.assert_close(step.mean, abar.sqrt() * step.denoised)
                assert torch.allclose(step.std, (1 - abar).sqrt())
                assert policy.latents_to_decode(step, x) is step.denoised
            x = reference.prev_sample
        sample = step.sample(torch.Generator().manual_seed(1))
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    torch.testing.assert_close(step.log_prob(sample), expected.log_prob(sample).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(
        step.log_prob(sample), gaussian_log_prob(sample, step.mean, step.std)
    )


def test_lcm_step_makes_one_unet_pass_without_cfg_doubling(pocket_lcm):
    policy = LCMPolicy(pocket_lcm.scheduler.config, num_steps=4)
    batches = []
    hook = pocket_lcm.unet.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    embeds = encode_prompts(pocket_lcm.tokenizer, pocket_lcm.text_encoder, ["a cat"] * 3)
    with torch.no_grad():
        policy(
            pocket_lcm.unet,
            torch.randn(3, 4, 8, 8),
            torch.full((3,), 999),
            Conditioning(embeds, embeds, guidance_scale=6.0),
        )
    hook.remove()
    assert batches == [3]


def test_an_lcm_lora_is_fused_into_the_base_and_rlcm_trains_on_top(tiny_model_dir, tmp_path):
    """SD 1.5 + LCM-LoRA, in miniature: a LoRA saved in diffusers' format is fused into the
    tiny UNet, the scheduler becomes an LCMScheduler, and an RL LoRA trains on top."""
    from conftest import TINY_PRESET
    from diffusers import StableDiffusionPipeline
    from tiny import save_random_lora

    from lowvram_ddpo.config import apply_overrides, load_preset, validate
    from lowvram_ddpo.models import has_lora
    from lowvram_ddpo.trainer import train

    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    lora_file = save_random_lora(base, tmp_path / "lcm-lora")

    plain = load_pipeline(str(tiny_model_dir))
    fused = load_pipeline(str(tiny_model_dir), lcm_lora=str(lora_file))
    assert isinstance(fused.scheduler, LCMScheduler) and not has_lora(fused.unet)
    name = next(n for n, _ in plain.unet.named_parameters() if n.endswith("to_q.weight"))
    assert not torch.equal(
        dict(plain.unet.named_parameters())[name], dict(fused.unet.named_parameters())[name]
    )

    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET.format(model=tiny_model_dir))
    config = load_preset(str(preset))
    apply_overrides(
        config,
        [f"model.lcm_lora='{lora_file}'", "sample.num_steps=4", "run.epochs=1"],
    )
    validate(config)
    history = train(config, tmp_path / "run")
    assert history[0]["optimizer_steps"] == 1 and history[0]["micro_steps"] == 8
    with pytest.raises(UserError, match="LCM-LoRA"):
        load_pipeline(str(tiny_model_dir), lcm_lora=str(tmp_path / "missing.safetensors"))


def test_no_network_while_loading_a_hub_model_or_lcm_lora_is_one_line(monkeypatch):
    """Online settings without a network: diffusers' LoRA loader asks the hub which file to
    take (``model_info``), whose HTTP client's ConnectError is not an OSError. It is met
    with the same one-line advice as a file missing offline, for the LCM-LoRA and the
    base model alike."""
    import types

    import httpx

    import lowvram_ddpo.models as models
    from lowvram_ddpo.models import fuse_lcm_lora

    def no_network(*args: object, **kwargs: object) -> None:
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    pipe = types.SimpleNamespace(load_lora_weights=no_network)
    with pytest.raises(UserError, match=r"LCM-LoRA 'org/lcm-lora' \(\[Errno -2\] Name"):
        fuse_lcm_lora(pipe, "org/lcm-lora")
    monkeypatch.setattr(models, "pipeline_class", no_network)
    with pytest.raises(UserError, match="could not load model 'org/model'.*hf download"):
        load_pipeline("org/model")


def test_sample_renders_the_pocket_lcm_in_its_few_steps(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lowvram_ddpo.cli import app

    steps = []
    original = LCMPolicy.__call__

    def counting(self, *args):  # noqa: ANN001, ANN002, ANN202
        steps.append(1)
        return original(self, *args)

    monkeypatch.setattr(LCMPolicy, "__call__", counting)
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--model",
            "pocket-lcm",
            "--prompts",
            "a small red circle on a blue background",
            "--seeds",
            "0",
            "--seeds",
            "1",
            "--grid",
            str(grid),
        ],
    )
    assert result.exit_code == 0, result.output
    assert grid.is_file() and len(steps) == 2 * 4  # 2 seeds x 4 LCM steps
