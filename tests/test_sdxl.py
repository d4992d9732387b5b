"""SDXL: the same policy, trainer and memory estimate on a pipeline with two text
encoders, pooled-text and time-id conditioning, checked against diffusers' own
StableDiffusionXLPipeline on a tiny random model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TINY_PRESET
from diffusers import StableDiffusionXLPipeline
from tiny import assert_replay_gives_ratio_one, build_tiny_sdxl_pipeline
from typer.testing import CliRunner

from lowvram_ddpo.algorithms.steps import MicroBatch, reward_weighted_loss
from lowvram_ddpo.architectures import build_components, default_architecture
from lowvram_ddpo.cli import app
from lowvram_ddpo.config import load_preset
from lowvram_ddpo.memory.estimate import estimate_memory, meta_run
from lowvram_ddpo.memory.units import GB
from lowvram_ddpo.models import load_pipeline
from lowvram_ddpo.policy import DDIMPolicy
from lowvram_ddpo.rollout import decode_latents, sample_trajectories
from lowvram_ddpo.text_encoding import encode_negative, encode_text, micro_conditioning


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    build_tiny_sdxl_pipeline().save_pretrained(folder)
    return folder


def test_prompts_are_encoded_as_diffusers_does(sdxl):
    text = encode_text(sdxl, ["a cat", "a dog on a hill"])
    with torch.no_grad():
        hidden, negative, pooled, negative_pooled = sdxl.encode_prompt(
            ["a cat", "a dog on a hill"], device="cpu", do_classifier_free_guidance=True
        )
    assert text.hidden.shape == (2, 16, 64)  # both encoders' widths, concatenated
    assert torch.equal(text.hidden, hidden) and torch.equal(text.pooled, pooled)
    empty = encode_negative(sdxl, "")  # no negative prompt: zeros, like diffusers
    assert torch.equal(empty.hidden, negative[:1])
    assert torch.equal(empty.pooled, negative_pooled[:1])
    assert encode_negative(sdxl, "blurry").hidden.abs().sum() > 0
    expected = sdxl._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32)
    assert torch.equal(micro_conditioning(sdxl.unet.config, 32), expected[0])


def test_rollout_reproduces_the_diffusers_sdxl_pipeline(sdxl):
    """Same seed, same DDIM eta=1 sampler, guidance 5: our rollout's final latent is the
    pipeline's (both draw x_T, then each step's noise, from the one CPU generator)."""
    policy = DDIMPolicy(sdxl.scheduler.config, num_steps=4, eta=1.0)
    with torch.no_grad():
        ours = sample_trajectories(
            sdxl,
            sdxl.unet,
            policy,
            ["a cat"],
            encode_negative(sdxl, ""),
            5.0,
            32,
            torch.Generator().manual_seed(0),
        )
        reference = sdxl(
            ["a cat"],
            num_inference_steps=4,
            guidance_scale=5.0,
            eta=1.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images
    assert ours.pooled_embeds.shape == (1, 32) and ours.time_ids is not None
    assert (ours.latents[:, -1] - reference).abs().max().item() < 1e-5


def test_replay_gives_ratio_one_and_rwr_trains(sdxl):
    policy = DDIMPolicy(sdxl.scheduler.config, num_steps=3, eta=1.0)
    negative = encode_negative(sdxl, "")
    with torch.no_grad():
        samples = sample_trajectories(
            sdxl, sdxl.unet, policy, ["a", "b", "c"], negative, 5.0, 32, torch.Generator()
        )
    assert_replay_gives_ratio_one(sdxl.unet, policy, samples, negative, 5.0)
    batch = MicroBatch(samples=torch.tensor([0, 1]), steps=torch.tensor([0, 0]))
    loss, _ = reward_weighted_loss(
        sdxl.unet, policy.scheduler, samples, batch, torch.ones(3), torch.Generator()
    )
    assert torch.isfinite(loss) and loss.item() > 0


def test_an_fp16_vae_that_asks_for_it_decodes_in_fp32_and_stays_fp16():
    vae = build_tiny_sdxl_pipeline().vae
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = decode_latents(vae, z)
    vae.half()
    upcast = decode_latents(vae, z, upcast=True)
    assert next(vae.parameters()).dtype == torch.float16
    assert (upcast - reference).abs().max().item() < 1e-2


def test_a_saved_sdxl_folder_trains_a_lora_and_samples_with_it(sdxl_dir, tmp_path):
    pipe = load_pipeline(str(sdxl_dir))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    preset = tmp_path / "tiny-sdxl.toml"
    preset.write_text(TINY_PRESET.format(model=sdxl_dir))
    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["train", "--preset", str(preset), "--output", str(run_dir), "--epochs", "2"],
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["optimizer_steps"] == 1 for m in metrics)
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()
    result = runner.invoke(
        app,
        ["sample", "--lora", str(run_dir), "--prompts", "a cat", "--seeds", "0", "--seeds", "1"]
        + ["--grid", str(tmp_path / "grid.png"), "--reward", "jpeg_incompressibility"],
    )
    assert result.exit_code == 0, result.output
    means = [float(v) for v in re.findall(r"mean reward ([-\d.]+)", result.output)]
    assert len(means) == 2 and means[0] != means[1]  # the LoRA changed the images


def test_sdxl_is_estimated_from_its_real_shapes():
    parts = build_components("sdxl", "meta", torch.float16)
    count = [sum(p.numel() for p in m.parameters()) for m in (parts.unet, parts.text_encoder_2)]
    assert count == [2_567_463_684, 694_659_840]  # SDXL base 1.0's UNet and OpenCLIP bigG
    assert parts.native_resolution == 1024
    assert default_architecture("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    config = load_preset("incompressibility")
    config.sample.resolution = 1024
    config.memory.gradient_checkpointing = True
    report = estimate_memory(config, "sdxl")
    encode = report.phase("encode")
    assert 1.4 * GB < encode.held["text encoder"] < 1.7 * GB  # both encoders, fp16
    assert report.phase("decode").held["vae"] > 0.3 * GB  # upcast to fp32 for decoding
    assert report.phase("training").peak_reserved < report.phase("decode").peak_reserved
    # the fp16 run decodes in fp32, without autocast: more working memory than a bf16
    # run's decode (autocast keeps group norms in fp32 there too, hence not twice)
    config.model.mixed_precision = "bf16"
    bf16 = meta_run(config, "sdxl").decode(tiling=False)  # the decode phase's working peak
    fp16 = report.phase("decode")
    assert fp16.peak_allocated - sum(fp16.held.values()) > 1.1 * bf16


def test_sdxls_lowest_level_holds_most_of_what_checkpointing_recomputes():
    """SDXL's 32x32 level (its ten-block attention layers at 1280 channels) is ~70% of the
    arithmetic checkpointing runs again (README), and nearly all of its weights."""
    from lowvram_ddpo.speed.flops import epoch_flops

    recomputation = epoch_flops(load_preset("sdxl-aesthetic"), "sdxl", False).recomputation
    assert len(recomputation.arithmetic) == 3  # three resolution levels
    assert 0.25 < recomputation.arithmetic[1] < 0.35, recomputation
    assert recomputation.weights[1] < 0.1


def test_bench_memory_builds_sdxl_at_its_native_size():
    result = CliRunner().invoke(
        app,
        ["bench", "memory", "--preset", "incompressibility", "--arch", "sdxl", "--json"]
        + ["--set", "memory.gradient_checkpointing=true"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["arch"] == "sdxl" and report["settings"]["resolution"] == 1024
    assert any("native size" in note for note in report["notes"])
    # without --vram it says what --vram picks for the next common card below its own
    below = [size for size in (4, 6, 8, 12, 16, 24) if size < report["fits_card_gb"]][-1]
    hint = [
        note
        for note in report["notes"]
        if note.startswith(f"for a{'n' * (below == 8)} {below} GB card")
    ]
    assert hint and f"--vram {below}GB: " in hint[0], report["notes"]


def test_the_measured_bench_path_builds_a_random_sdxl_pipeline(sdxl_dir, tmp_path):
    """`bench memory` on a GPU: random weights from the folder's configs, one short epoch."""
    from lowvram_ddpo.memory.measure import measure_run

    preset = tmp_path / "tiny-sdxl.toml"
    preset.write_text(TINY_PRESET.format(model=sdxl_dir))
    report = measure_run(load_preset(str(preset)), str(sdxl_dir))
    assert [p.name for p in report.phases] == ["encode", "sampling", "decode", "reward", "training"]
    assert all(p.seconds and p.seconds > 0 for p in report.phases)


def test_bench_speed_runs_a_gpu_preset_on_the_cpu(sdxl_dir):
    """The SDXL preset asks for fp16, which the trainer turns into fp32 on the CPU: the
    random weights must be built in fp32 too (they were fp16, and the first UNet call
    failed on mixed dtypes), and the report says what ran. Its replay is then fp32's: far
    inside the clip range."""
    result = CliRunner().invoke(
        app,
        ["bench", "speed", "--preset", "sdxl-aesthetic", "--arch", str(sdxl_dir),
         "--resolution", "32", "--batches", "1", "--set", "sample.num_steps=2",
         "--set", "memory.vram=off", "--peak-tflops", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # the settings that ran, not the preset's fp16 and 8-bit AdamW (no CUDA here)
    assert report["settings"]["mixed_precision"] == "no"
    assert report["settings"]["optimizer"] == "adamw"
    assert report["replay"]["replay_rms"] < 1e-5


def test_vae_tiling_decodes_in_tiles_with_the_same_image(monkeypatch):
    from tiny import tiny_vae

    from lowvram_ddpo.models import use_vae_tiling

    vae = tiny_vae(sample_size=64)  # tiles of 64 px (the smaller of its size and 512 px)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 128 px
    whole = decode_latents(vae, z)
    tiles = []
    original = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: tiles.append(1) or original(*a, **k))
    use_vae_tiling(vae, True)
    tiled = decode_latents(vae, z)
    assert tiles and (vae.tile_sample_min_size, vae.tile_latent_min_size) == (64, 16)
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    # the same picture: group norms see one tile at a time and seams are blended
    assert (tiled - whole).abs().mean().item() < 0.02
    use_vae_tiling(vae, False)
    assert not vae.use_tiling


def test_vram_fit_reaches_for_vae_tiling_on_sdxl():
    from lowvram_ddpo.memory.fit import fit_to_vram

    config = load_preset("incompressibility")
    config.sample.resolution = 1024
    fit = fit_to_vram(config, "sdxl", 8 * GB)
    assert fit.config.memory.vae_tiling and fit.config.memory.quantize == "none"
    assert "memory.vae_tiling False -> True" in fit.changes
    # with the calibrated ~1 GiB CUDA context, the text encoders leave the card at 8 GB
    # (cheap with the prompt cache), before any quantised base
    assert fit.config.memory.text_encoders_on_cpu
    small = fit_to_vram(config, "sdxl", 6 * GB)  # SDXL at 1024 px on a 6 GB card
    assert small.config.memory.quantize == "fp8"  # before nf4: closer to the base
    tiled = estimate_memory(fit.config, "sdxl").phase("decode").peak_reserved
    fit.config.memory.vae_tiling = False
    untiled = estimate_memory(fit.config, "sdxl").phase("decode").peak_reserved
    assert untiled > 1.3 * tiled


def test_rlcm_policy_runs_on_sdxl_conditioning(sdxl):
    """SDXL + an LCM-LoRA is trained with the LCM policy: no guidance embedding, so
    guidance above 1 is classifier-free, with the pooled and time-id inputs doubled too."""
    from diffusers import LCMScheduler

    from lowvram_ddpo.policy import LCMPolicy

    config = LCMScheduler.from_config(sdxl.scheduler.config).config
    policy = LCMPolicy(config, num_steps=4)
    negative = encode_negative(sdxl, "")
    with torch.no_grad():
        samples = sample_trajectories(
            sdxl, sdxl.unet, policy, ["a", "b", "c"], negative, 1.5, 32, torch.Generator()
        )
    assert samples.latents.shape == (3, 5, 4, 8, 8)
    assert_replay_gives_ratio_one(sdxl.unet, policy, samples, negative, 1.5)


def test_an_sdxl_lcm_lora_is_fused_and_rlcm_trains_on_top(sdxl_dir, tmp_path):
    """rlcm-sdxl-aesthetic in miniature: an LCM-LoRA saved in diffusers' SDXL format is
    fused into the UNet, the sampler becomes the LCM policy, an RL LoRA trains on top."""
    from diffusers import LCMScheduler
    from tiny import save_random_lora

    from lowvram_ddpo.config import apply_overrides, validate
    from lowvram_ddpo.trainer import train

    lora_file = save_random_lora(load_pipeline(str(sdxl_dir)), tmp_path / "lcm-lora")
    fused = load_pipeline(str(sdxl_dir), lcm_lora=str(lora_file))
    assert isinstance(fused.scheduler, LCMScheduler)

    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET.format(model=sdxl_dir))
    config = load_preset(str(preset))
    apply_overrides(
        config,
        [
            f"model.lcm_lora='{lora_file}'",
            "sample.num_steps=4",
            "sample.guidance_scale=1.0",
            "run.epochs=1",
        ],
    )
    validate(config)
    history = train(config, tmp_path / "run")
    assert history[0]["optimizer_steps"] == 1 and history[0]["micro_steps"] == 8
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
