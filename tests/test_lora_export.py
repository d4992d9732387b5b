"""The exported LoRA is the trained model: plain diffusers' ``load_lora_weights`` and
``lowvram-ddpo sample`` render exactly what the trainer renders, with alpha != rank."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.models import LORA_WEIGHTS_NAME, attach_lora, save_lora_for_diffusers
from lowvram_ddpo.rollout import render
from lowvram_ddpo.sampling import SampleRequest, render_comparison
from lowvram_ddpo.trainer import Trainer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS, SEEDS = ["a cat", "a dog"], [0, 3]
IMAGE_TOLERANCE = 1e-4
"""Largest pixel difference (images in [0, 1], fp32 on the CPU) between two renders of the
same weights: rounding in the different order the layers are summed, nothing more."""


def _unet_output(unet: torch.nn.Module, sdxl: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    width = 64 if sdxl else 32
    text = torch.randn(2, 16, width, generator=generator)
    extra = {}
    if sdxl:
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=text, **extra).sample


def _trained_looking_lora(pipe, rank: int, alpha: float) -> None:  # noqa: ANN001
    """A LoRA whose B matrices are not zero, as after training."""
    params = attach_lora(pipe.unet, rank, alpha, TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.3)


def _round_trip(build, tmp_path, sdxl: bool) -> None:  # noqa: ANN001
    trained = build()
    _trained_looking_lora(trained, rank=2, alpha=16.0)
    expected = _unet_output(trained.unet, sdxl)
    save_lora_for_diffusers(trained.unet, tmp_path)

    plain = build()
    base = _unet_output(plain.unet, sdxl)
    plain.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_NAME)
    loaded = _unet_output(plain.unet, sdxl)
    assert (loaded - expected).abs().max().item() < 1e-5
    # the adapter matters (so the check above could fail): at alpha = rank, as an export
    # without alpha loads, the output would be far from the trained one
    assert (expected - base).abs().max().item() > 100 * 1e-5


def test_an_sd_lora_with_alpha_above_rank_loads_at_full_strength(tmp_path):
    _round_trip(build_tiny_pipeline, tmp_path, sdxl=False)


def test_an_sdxl_lora_with_alpha_above_rank_loads_at_full_strength(tmp_path):
    _round_trip(build_tiny_sdxl_pipeline, tmp_path, sdxl=True)


def test_diffusers_and_sample_render_what_the_trainer_renders(
    tmp_path, tiny_preset, tiny_model_dir
):
    config = load_preset(str(tiny_preset))
    apply_overrides(
        config, ["model.lora_rank=4", "model.lora_alpha=32", "run.epochs=1", "sample.num_steps=3"]
    )
    validate(config)
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir)
    trainer.fit()
    unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
    s = config.sample

    def trainer_render() -> torch.Tensor:
        with torch.no_grad():
            return render(
                trainer.pipe, unet, trainer.policy, PROMPTS, SEEDS, trainer.negative,
                s.guidance_scale, s.resolution,
            )  # fmt: skip

    ours = trainer_render()
    unet.disable_adapters()
    base = trainer_render()
    unet.enable_adapters()
    assert (ours - base).abs().max().item() > 100 * IMAGE_TOLERANCE  # the LoRA changed them

    plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(run_dir))  # the run folder, as the README shows
    for p, prompt in enumerate(PROMPTS):
        for i, seed in enumerate(SEEDS):
            image = plain(
                prompt,
                num_inference_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                eta=s.eta,
                height=s.resolution,
                width=s.resolution,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images[0]
            assert (image - ours[p, i]).abs().max().item() < IMAGE_TOLERANCE, (prompt, seed)

    sampled = render_comparison(SampleRequest(prompts=PROMPTS, seeds=SEEDS, lora=str(run_dir)))
    lora_panel = next(v for k, v in sampled.panels.items() if k.startswith("LoRA"))
    assert (lora_panel - ours).abs().max().item() < IMAGE_TOLERANCE
    assert (sampled.panels["base"] - base).abs().max().item() < IMAGE_TOLERANCE
