"""FLUX.2-klein (a flow transformer with a Qwen3 text encoder and 2x2-patched latents)
through the same trainer: a tiny ``Flux2KleinPipeline`` saved with ``save_pretrained``,
sampled as diffusers samples it, trained through the CLI (GRPO, NFT), its LoRA loaded back
by diffusers' own pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRESET
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file
from tiny import build_tiny_flux2_pipeline
from typer.testing import CliRunner

from lowvram_ddpo import flux2
from lowvram_ddpo.checkpoint import ADAPTER_FILE
from lowvram_ddpo.cli import app
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.lora_export import LORA_WEIGHTS_NAME
from lowvram_ddpo.models import (
    load_adapter_state_dict,
    load_pipeline,
    make_trainable,
    with_denoiser_as_unet,
)
from lowvram_ddpo.policy import FlowSDEPolicy, build_policy
from lowvram_ddpo.policy.base import Conditioning
from lowvram_ddpo.rollout import image_tokens, rollout, sample_trajectories
from lowvram_ddpo.text_encoding import encode_negative, encode_text

FLUX2_PRESET = (
    TINY_PRESET.replace(
        'mixed_precision = "no"', 'mixed_precision = "no"\nlora_rank = 4\nlora_alpha = 8.0'
    )
    .replace("num_steps = 4", "num_steps = 4\nguidance_scale = 2.0")
    .replace("learning_rate = 3e-2", "learning_rate = 3e-2\ntimestep_fraction = 0.75")
    .replace('description = "tiny test run"', 'description = "tiny FLUX.2-klein test run"')
)
"""The tiny test preset (conftest) with guidance, a LoRA alpha that is not its rank, and 3
of the 4 steps trained."""


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flux2") / "pipeline"
    build_tiny_flux2_pipeline().save_pretrained(folder)
    return folder


def _diffusers_images(pipe: Flux2KleinPipeline, steps: int, guidance: float) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt="a red circle", num_inference_steps=steps, height=32, width=32,
        guidance_scale=guidance,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def _policy(pipe: Flux2KleinPipeline, steps: int, resolution: int = 32) -> FlowSDEPolicy:
    tokens = image_tokens(pipe.unet, pipe.vae, resolution)
    policy = build_policy(
        "auto", pipe.scheduler.config, pipe.unet.config, steps, 1.0, 0.7, 0, tokens
    )
    assert isinstance(policy, FlowSDEPolicy)
    return policy


def test_a_flux2_klein_folder_loads_with_its_transformer_as_the_denoiser(flux2_dir):
    pipe = load_pipeline(str(flux2_dir))
    assert isinstance(pipe, Flux2KleinPipeline)
    assert pipe.unet is pipe.transformer


def test_flux2_prompts_are_encoded_as_its_pipeline_does(flux2_dir):
    pipe = load_pipeline(str(flux2_dir))
    embeds = encode_text(pipe, ["a cat", "a dog"])
    hidden, _ = pipe.encode_prompt(["a cat", "a dog"], device="cpu")
    assert torch.equal(embeds.hidden, hidden) and embeds.pooled is None
    assert embeds.hidden.shape[1] == flux2.TEXT_TOKENS  # padded, as klein was trained
    assert not torch.equal(embeds.hidden[0], embeds.hidden[1])
    assert encode_negative(pipe, "").hidden.shape == embeds.hidden[:1].shape


@pytest.mark.parametrize(("distilled", "guidance"), [(False, 4.0), (True, 1.0)])
def test_the_ode_policy_renders_what_diffusers_flux2_pipeline_renders(distilled, guidance):
    """Everything FLUX.2 does differently at once: the Qwen3 prompt, the packed tokens and
    their position ids, the timestep scale, the size-dependent shift, CFG as two passes,
    the VAE's BatchNorm statistics and 2x2 patches at decoding."""
    pipe = with_denoiser_as_unet(build_tiny_flux2_pipeline(distilled=distilled))
    expected = _diffusers_images(pipe, 4, guidance)
    negative = encode_negative(pipe, "") if guidance > 1 else None
    generator = torch.Generator().manual_seed(0)
    ours = sample_trajectories(
        pipe, pipe.unet, _policy(pipe, 4).for_viewing(), ["a red circle"], negative, guidance,
        32, generator,
    )  # fmt: skip
    torch.testing.assert_close(ours.images, expected, rtol=0, atol=1e-5)
    assert ours.latents.shape[2:] == (16, 8, 8)  # 4 VAE channels x 2x2 patches, 32 px / 4


def test_the_shift_depends_on_the_image_size_as_the_pipeline_computes_it():
    pipe = with_denoiser_as_unet(build_tiny_flux2_pipeline())
    small, large = _policy(pipe, 4, 32).timesteps(), _policy(pipe, 4, 128).timesteps()
    assert small[0] == large[0] == 1000 and (large[1:] > small[1:]).all()  # more tokens: noisier
    with pytest.raises(Exception, match="token count"):
        build_policy("auto", pipe.scheduler.config, pipe.unet.config, 4, 1.0)


def test_replaying_a_flux2_rollout_gives_ratio_one():
    pipe = with_denoiser_as_unet(build_tiny_flux2_pipeline())
    make_trainable(pipe.unet, rank=2, alpha=2.0, targets=[])
    policy = _policy(pipe, 4)
    cond = Conditioning.of(encode_text(pipe, ["a cat", "a dog"]), encode_negative(pipe, ""), 3.0)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    latents, log_probs, timesteps, _, _ = rollout(
        pipe.unet, policy, cond, noise, torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        for k in range(len(timesteps)):
            step = policy(pipe.unet, latents[:, k], timesteps[k].expand(2), cond)
            replayed = step.log_prob(latents[:, k + 1])
            assert (replayed - log_probs[:, k]).abs().max() < 1e-5


def test_the_default_lora_covers_every_attention_projection():
    transformer = build_tiny_flux2_pipeline().transformer
    make_trainable(transformer, rank=2, alpha=2.0, targets=[])
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if "lora_A" in n}
    double = {f"transformer_blocks.0.{t}" for t in flux2.DOUBLE_BLOCK_TARGETS}
    single = {f"single_transformer_blocks.0.attn.{t}" for t in ("to_qkv_mlp_proj", "to_out")}
    assert names == double | single  # image and text streams, and the single blocks


def test_flux2_trains_through_the_cli_and_diffusers_loads_its_lora(flux2_dir, tmp_path):
    preset = tmp_path / "flux2.toml"
    preset.write_text(FLUX2_PRESET.format(model=flux2_dir))
    run_dir = tmp_path / "run"
    settings = ["train.algorithm=grpo", "sample.group_size=4",
                "prompts.prompts=a cat,a dog,a fox,an owl"]  # fmt: skip
    args = ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    result = CliRunner().invoke(app, args + [a for s in settings for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics)

    pipe = Flux2KleinPipeline.from_pretrained(flux2_dir)
    before = _diffusers_images(pipe, 3, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns when a layer of the file is not loaded
        pipe.load_lora_weights(str(run_dir), weight_name=LORA_WEIGHTS_NAME)
    assert float((_diffusers_images(pipe, 3, 2.0) - before).abs().max()) > 1e-4  # it acts

    # every trained layer at its trained strength: diffusers' transformer gives the velocity
    # of ours (the checkpoint's adapter on the same base)
    ours = load_pipeline(str(flux2_dir)).transformer
    make_trainable(ours, rank=4, alpha=8.0, targets=[])
    load_adapter_state_dict(ours, load_file(run_dir / "checkpoints" / "epoch-0002" / ADAPTER_FILE))
    x, t, text = torch.randn(1, 16, 8, 8), torch.tensor([700.0]), torch.randn(1, 12, 48)
    with torch.no_grad():
        theirs_v = flux2.velocity(pipe.transformer, x, t, text)
        ours_v = flux2.velocity(ours, x, t, text)
    torch.testing.assert_close(theirs_v, ours_v, rtol=1e-5, atol=1e-5)

    # the before/after grid of the run, with its own settings
    grid = tmp_path / "grid.png"
    args = ["sample", "--lora", str(run_dir), "--prompts", "a cat", "--seeds", "0",
            "--steps", "3", "--grid", str(grid), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert grid.is_file()


def test_nft_trains_flux2(flux2_dir, tmp_path):
    preset = tmp_path / "flux2.toml"
    preset.write_text(FLUX2_PRESET.format(model=flux2_dir).replace("epochs = 2", "epochs = 1"))
    run_dir = tmp_path / "run"
    settings = ["train.algorithm=nft", "sample.group_size=4", "sample.guidance_scale=1.0",
                "prompts.prompts=a cat,a dog,a fox,an owl"]  # fmt: skip
    args = ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    result = CliRunner().invoke(app, args + [a for s in settings for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["grad_norm"] > 0


def test_a_guidance_distilled_klein_refuses_guidance(tmp_path, monkeypatch):
    """Refused from its model_index.json, before the model is loaded (minutes for klein);
    a pipeline handed over in code is checked too (`sample`, benchmarks)."""
    from lowvram_ddpo.flux2 import check_guidance
    from lowvram_ddpo.trainer import Trainer

    folder = tmp_path / "distilled"
    pipe = build_tiny_flux2_pipeline(distilled=True)
    pipe.save_pretrained(folder)
    with pytest.raises(UserError, match="guidance-distilled"):
        check_guidance(pipe, 4.0)
    check_guidance(pipe, 1.0)
    preset = tmp_path / "flux2.toml"
    preset.write_text(FLUX2_PRESET.format(model=folder))

    def load_models(self, dtype):  # noqa: ANN001, ANN202
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(Trainer, "load_models", load_models)
    result = CliRunner().invoke(
        app, ["train", "--preset", str(preset), "--output", str(tmp_path / "run"),
              "--log-with", "none"],
    )  # fmt: skip
    assert result.exit_code != 0 and "sample.guidance_scale=1" in result.output
    assert "Traceback" not in result.output


def test_flux2_klein_is_estimated_from_its_real_shapes():
    from lowvram_ddpo.architectures import build_components, random_pipeline

    parts = build_components("flux2-klein", "meta", torch.bfloat16)
    assert 3.7e9 < sum(p.numel() for p in parts.unet.parameters()) < 4.0e9  # klein's 4 B
    assert 3.9e9 < sum(p.numel() for p in parts.text_encoder.parameters()) < 4.1e9  # Qwen3-4B
    assert parts.family == "flux2" and parts.native_resolution == 1024
    pipe = random_pipeline("flux2-klein", torch.bfloat16, device="meta")  # for GPU measurements
    assert isinstance(pipe, Flux2KleinPipeline) and pipe.unet is pipe.transformer
    assert "<|im_start|>" in pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True
    )


def test_the_flux2_klein_preset_fits_12_gb_only_with_its_nf4_base():
    from lowvram_ddpo.config import apply_overrides, load_preset
    from lowvram_ddpo.memory.estimate import estimate_memory

    config = load_preset("flux2-klein-grpo-incompressibility")
    nf4 = estimate_memory(config, "flux2-klein")
    apply_overrides(config, ["memory.quantize=none"])
    bf16 = estimate_memory(config, "flux2-klein")
    assert nf4.peak_bytes <= 11 * 2**30 < bf16.peak_bytes  # 12 GB less ~1 GB CUDA context
    held = bf16.phase("training").held["unet"] - nf4.phase("training").held["unet"]
    assert 5.0 * 2**30 < held < 6.0 * 2**30  # 3.9 B bf16 weights -> 4 bits (+ their scales)


def test_the_sample_command_renders_flux2_in_bf16_on_a_gpu(flux2_dir, tiny_model_dir):
    from lowvram_ddpo.sampling import _gpu_dtype

    assert _gpu_dtype(str(flux2_dir), None) == torch.bfloat16  # fp16 overflows FLUX
    assert _gpu_dtype(str(tiny_model_dir), None) == torch.float16


def test_the_model_family_is_read_before_loading(flux2_dir, tiny_model_dir):
    from lowvram_ddpo.preflight import is_flow_index, saved_model_index

    assert is_flow_index(saved_model_index(str(flux2_dir))) is True
    assert is_flow_index(saved_model_index(str(tiny_model_dir))) is False
    assert is_flow_index({"_class_name": "SomeOtherPipeline"}) is None  # the loader explains
    assert saved_model_index("not a/valid id") is None  # the loader explains it, in one line
    assert saved_model_index("someone/never-downloaded") is None  # nothing is downloaded


def test_a_resolution_off_the_patch_grid_is_one_line():
    """FLUX.2 latents are 2x2 patches of the VAE's: a resolution the VAE alone would take
    (a multiple of its factor) is refused, naming both ways to set it."""
    from lowvram_ddpo.rollout import latent_shape

    pipe = with_denoiser_as_unet(build_tiny_flux2_pipeline())
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_shape(pipe.unet, pipe.vae, 4 * factor)
    with pytest.raises(
        UserError,
        match=f"multiple of {2 * factor} .*sample --resolution|"
        f"sample --resolution.* multiple of {2 * factor}",
    ):
        latent_shape(pipe.unet, pipe.vae, 3 * factor)
