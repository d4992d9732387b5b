"""The exported LoRA is the trained model: plain diffusers' ``load_lora_weights`` and
``lowvram-ddpo sample`` render exactly what the trainer renders, with alpha != rank, from
the diffusers-layout file and from the kohya-layout file the UIs load."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from typer.testing import CliRunner, Result

from lowvram_ddpo.checkpoint import save_checkpoint
from lowvram_ddpo.cli import app
from lowvram_ddpo.config import apply_overrides, dump_toml, load_preset, validate
from lowvram_ddpo.lora_export import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    save_kohya_lora,
    save_lora_for_diffusers,
)
from lowvram_ddpo.models import attach_lora, trainable_parameters
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


def _round_trip(build, tmp_path, sdxl: bool, kohya: bool = False) -> None:  # noqa: ANN001
    tmp_path.mkdir(exist_ok=True)
    trained = build()
    _trained_looking_lora(trained, rank=2, alpha=16.0)
    expected = _unet_output(trained.unet, sdxl)
    if kohya:
        save_kohya_lora(trained.unet, tmp_path, epochs_done=3)
    else:
        save_lora_for_diffusers(trained.unet, tmp_path)

    plain = build()
    base = _unet_output(plain.unet, sdxl)
    name = KOHYA_WEIGHTS_NAME if kohya else LORA_WEIGHTS_NAME
    plain.load_lora_weights(str(tmp_path), weight_name=name)
    loaded = _unet_output(plain.unet, sdxl)
    assert (loaded - expected).abs().max().item() < 1e-5
    # the adapter matters (so the check above could fail): at alpha = rank, as an export
    # without alpha loads, the output would be far from the trained one
    assert (expected - base).abs().max().item() > 100 * 1e-5


def test_an_sd_lora_with_alpha_above_rank_loads_at_full_strength(tmp_path):
    _round_trip(build_tiny_pipeline, tmp_path, sdxl=False)


def test_an_sdxl_lora_with_alpha_above_rank_loads_at_full_strength(tmp_path):
    _round_trip(build_tiny_sdxl_pipeline, tmp_path, sdxl=True)


def test_diffusers_loads_the_kohya_file_at_its_trained_alpha(tmp_path):
    _round_trip(build_tiny_pipeline, tmp_path / "sd", sdxl=False, kohya=True)
    _round_trip(build_tiny_sdxl_pipeline, tmp_path / "sdxl", sdxl=True, kohya=True)


FIRST_MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
MID_MODULE = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def test_the_kohya_file_follows_kohyas_naming(tmp_path):
    pipe = build_tiny_pipeline()
    _trained_looking_lora(pipe, rank=2, alpha=16.0)
    path = save_kohya_lora(pipe.unet, tmp_path, epochs_done=3)
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alpha = f.get_tensor(
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
        )
        down = f.get_tensor(
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight"
        )
    assert all(KOHYA_KEY.match(key) for key in keys), sorted(keys)[:3]
    modules = {key.rsplit(".", 2)[0] for key in keys if key.endswith(".weight")}
    assert len(keys) == 3 * len(modules)  # down, up and alpha for every module
    assert alpha.item() == 16.0 and down.shape[0] == 2  # the trained alpha; rank rows
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "16.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_epoch"] == "3"


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
    plain.load_lora_weights(str(run_dir))  # the run folder, as the README shows
    assert (_render_plain(plain, s) - ours).abs().max().item() < IMAGE_TOLERANCE

    # the kohya file the run wrote, as `lowvram-ddpo export` hands it to a UI
    exported = tmp_path / "loras" / "mine.safetensors"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--output", str(exported)])
    assert result.exit_code == 0, result.output
    kohya = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    kohya.load_lora_weights(str(exported.parent), weight_name=exported.name)
    assert (_render_plain(kohya, s) - ours).abs().max().item() < IMAGE_TOLERANCE

    sampled = render_comparison(SampleRequest(prompts=PROMPTS, seeds=SEEDS, lora=str(run_dir)))
    lora_panel = next(v for k, v in sampled.panels.items() if k.startswith("with LoRA"))
    assert (lora_panel - ours).abs().max().item() < IMAGE_TOLERANCE
    assert (sampled.panels["base model"] - base).abs().max().item() < IMAGE_TOLERANCE


def _render_plain(pipe: StableDiffusionPipeline, s) -> torch.Tensor:  # noqa: ANN001
    """[prompts, seeds, 3, H, W] from plain diffusers, one image per call, seeded as ours."""
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in PROMPTS:
        row = []
        for seed in SEEDS:
            image = pipe(
                prompt,
                num_inference_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                eta=s.eta,
                height=s.resolution,
                width=s.resolution,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images[0]
            row.append(image)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_export_writes_either_layout_and_explains_mistakes(tmp_path, tiny_preset, monkeypatch):
    pipe = build_tiny_pipeline()
    _trained_looking_lora(pipe, rank=2, alpha=16.0)
    optimizer = torch.optim.SGD(trainable_parameters(pipe.unet), lr=0.1)
    config = load_preset(str(tiny_preset))
    apply_overrides(config, ["model.lora_rank=2", "model.lora_alpha=16"])
    run = tmp_path / "myrun"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(config))
    for epoch in (1, 2):
        save_checkpoint(run, pipe.unet, optimizer, epoch, {})
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def export(*args: str) -> Result:
        return runner.invoke(app, ["export", str(run), *args])

    assert export().exit_code == 0
    newest = run / "checkpoints" / "epoch-0002"
    assert (tmp_path / "myrun-epoch2.safetensors").read_bytes() == (
        newest / KOHYA_WEIGHTS_NAME
    ).read_bytes()
    assert export("--epoch", "1").exit_code == 0 and Path("myrun-epoch1.safetensors").is_file()
    assert export("--format", "diffusers").exit_code == 0
    assert (
        Path("myrun-epoch2-diffusers.safetensors").read_bytes()
        == (newest / LORA_WEIGHTS_NAME).read_bytes()
    )
    # a checkpoint written before kohya files existed: converted from its adapter
    (newest / KOHYA_WEIGHTS_NAME).unlink()
    assert export("--output", "old.safetensors").exit_code == 0
    converted = load_file("old.safetensors")
    written = load_file("myrun-epoch2.safetensors")
    assert converted.keys() == written.keys()
    assert all(torch.equal(converted[k], written[k]) for k in written)

    for args, says in [
        (["--epoch", "7"], "no checkpoint of epoch 7"),
        (["--format", "onnx"], "unknown --format"),
        (["--output", "x.pt"], "must end in .safetensors"),
    ]:
        result = export(*args)
        assert result.exit_code == 2 and says in result.output, (args, result.output)
        assert "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
