"""SD 3.x (a flow-matching transformer) through the same trainer: a tiny SD3 pipeline saved
with ``save_pretrained``, trained through the CLI with Flow-GRPO's SDE policy, its LoRA
loaded back by diffusers' own SD3 pipeline."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRESET
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
from tiny import build_tiny_sd3_pipeline
from typer.testing import CliRunner

from lowvram_ddpo.checkpoint import ADAPTER_FILE
from lowvram_ddpo.cli import app
from lowvram_ddpo.lora_export import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from lowvram_ddpo.models import (
    SD3_LORA_TARGETS,
    load_adapter_state_dict,
    load_pipeline,
    make_trainable,
)
from lowvram_ddpo.text_encoding import encode_negative, encode_text, text_encoders

SD3_PRESET = (
    TINY_PRESET.replace(
        'mixed_precision = "no"', 'mixed_precision = "no"\nlora_rank = 4\nlora_alpha = 8.0'
    )
    .replace("num_steps = 4", "num_steps = 4\nguidance_scale = 2.0")
    .replace("learning_rate = 3e-2", "learning_rate = 3e-2\ntimestep_fraction = 0.75")
    .replace('description = "tiny test run"', 'description = "tiny SD3 test run"')
)
"""The tiny test preset (conftest) with a LoRA alpha that is not its rank (the export must
keep the scale), guidance, and 3 of the 4 steps trained."""


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd3") / "pipeline"
    build_tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def test_an_sd3_folder_loads_with_its_transformer_as_the_denoiser(sd3_dir):
    pipe = load_pipeline(str(sd3_dir))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.unet is pipe.transformer
    assert len(text_encoders(pipe)) == 2  # two CLIPs; this folder has no T5


def test_sd3_prompts_are_encoded_as_its_pipeline_does(sd3_dir):
    pipe = load_pipeline(str(sd3_dir))
    embeds = encode_text(pipe, ["a cat", "a dog"])
    hidden, _, pooled, _ = pipe.encode_prompt(
        ["a cat", "a dog"], None, None, do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert torch.equal(embeds.hidden, hidden) and torch.equal(embeds.pooled, pooled)
    assert embeds.hidden.shape[1] == 16 + 16  # CLIP's tokens, then as many T5 zeros (no T5)
    negative = encode_negative(pipe, "")
    assert negative.hidden.shape[1:] == embeds.hidden.shape[1:] and negative.pooled is not None


def test_the_default_lora_covers_joint_attention_text_projections_too():
    transformer = build_tiny_sd3_pipeline().transformer
    make_trainable(transformer, rank=2, alpha=2.0, targets=[])
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if "lora_A" in n}
    assert "transformer_blocks.0.attn.add_q_proj" in names
    assert "transformer_blocks.0.attn.to_add_out" in names  # not in the last block: none there
    assert not any(".attn2." in n for n in names)  # Flow-GRPO leaves the second attention alone
    suffixes = {n.split("attn.", 1)[1] for n in names}
    assert suffixes == {t.removeprefix("attn.") for t in SD3_LORA_TARGETS}


def test_sd3_trains_through_the_cli_and_diffusers_loads_its_lora(sd3_dir, tmp_path):
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics)
    assert (run_dir / LORA_WEIGHTS_NAME).is_file()
    assert not (run_dir / KOHYA_WEIGHTS_NAME).exists()  # no kohya layout for SD3

    def render(pipe: StableDiffusion3Pipeline) -> torch.Tensor:
        return pipe(
            "a cat", num_inference_steps=3, height=32, width=32, guidance_scale=2.0,
            max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns when a layer of the file is not loaded
        pipe.load_lora_weights(str(run_dir), weight_name=LORA_WEIGHTS_NAME)
    assert float((render(pipe) - before).abs().max()) > 1e-3  # the trained LoRA acts

    # every trained layer, at its trained strength: diffusers' transformer gives the velocity
    # of ours (the checkpoint's adapter on the same base)
    ours = load_pipeline(str(sd3_dir)).transformer
    make_trainable(ours, rank=4, alpha=8.0, targets=[])
    load_adapter_state_dict(ours, load_file(run_dir / "checkpoints" / "epoch-0002" / ADAPTER_FILE))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([700.0])
    text = torch.randn(1, 10, 64), torch.randn(1, 64)
    with torch.no_grad():
        theirs_v = pipe.transformer(x, text[0], text[1], t).sample
        ours_v = ours(x, text[0], text[1], t).sample
    torch.testing.assert_close(theirs_v, ours_v, rtol=1e-5, atol=1e-5)


def test_an_sd3_lora_has_no_kohya_export(sd3_dir, tmp_path):
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir).replace("epochs = 2", "epochs = 1"))
    run_dir = tmp_path / "run"
    runner = CliRunner()
    args = ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["export", str(run_dir), "--format", "kohya"])
    assert result.exit_code != 0 and "no kohya layout" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        app,
        [
            "export",
            str(run_dir),
            "--format",
            "diffusers",
            "--output",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_reward_weighted_regression_is_refused_for_flow_models(sd3_dir, tmp_path, monkeypatch):
    """Refused from the folder's model_index.json, before the (for SD 3.5: minutes of)
    loading."""
    import lowvram_ddpo.trainer

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(lowvram_ddpo.trainer, "load_pipeline", never)
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    result = CliRunner().invoke(
        app, ["train", "--preset", str(preset), "--set", "train.algorithm=rwr", "--output",
              str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code != 0 and "not available for flow-matching models" in result.output
    assert "Traceback" not in result.output


def test_grpo_trains_sd3_on_groups_of_one_prompt(sd3_dir, tmp_path):
    """Flow-GRPO's shape: groups of 4 images per prompt, advantages within each group,
    the KL guard to the base (the transformer with its LoRA off)."""
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    run_dir = tmp_path / "run"
    settings = ["train.algorithm=grpo", "sample.group_size=4", "train.kl_coef=0.01",
                "prompts.prompts=a cat,a dog,a fox,an owl,a bee",
                "run.log_rollouts=true"]  # fmt: skip
    args = ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    result = CliRunner().invoke(app, args + [a for s in settings for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    for epoch in (1, 2):
        log = json.loads((run_dir / "rollouts" / f"epoch-{epoch:04d}-gathered.json").read_text())
        prompts, signal = log["prompts"], torch.tensor(log["signal"])
        assert len(prompts) == 16
        groups = [prompts[i : i + 4] for i in range(0, 16, 4)]
        assert all(len(set(group)) == 1 for group in groups)  # one prompt per group
        assert len({group[0] for group in groups}) == 4  # and a different one for each
        assert signal.view(4, 4).sum(dim=1).abs().max() < 1e-4  # centred within each group
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kl_to_base"] > 0 and all(m["grad_norm"] > 0 for m in metrics)


def test_sd35_medium_is_estimated_from_its_real_shapes():
    from lowvram_ddpo.architectures import build_components

    parts = build_components("sd35m", "meta", torch.float16)
    count = sum(p.numel() for p in parts.unet.parameters())
    assert 2.2e9 < count < 2.6e9  # the MMDiT-X transformer (2.5 B with its embeddings)
    assert 4.7e9 < sum(p.numel() for p in parts.text_encoder_3.parameters()) < 4.8e9  # T5-XXL
    assert parts.vae.config.latent_channels == 16 and parts.family == "sd3"
    without = build_components("sd35m", "meta", torch.float16, use_t5=False)
    assert without.text_encoder_3 is None and len(without.text_encoders) == 2


def test_nft_trains_sd3_from_final_images_and_resumes_its_sampling_policy(sd3_dir, tmp_path):
    """DiffusionNFT through the CLI: CFG-free, groups of 4, the velocity guard to the base;
    its sampling policy (a lagging copy of the LoRA) is in the checkpoint and comes back."""
    from lowvram_ddpo.checkpoint import OPTIMIZER_FILE

    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    run_dir = tmp_path / "run"
    settings = ["train.algorithm=nft", "sample.group_size=4", "sample.guidance_scale=1.0",
                "train.kl_coef=1e-4", "prompts.prompts=a cat,a dog,a fox,an owl"]  # fmt: skip
    args = ["train", "--preset", str(preset), "--output", str(run_dir), "--log-with", "none"]
    args += [a for s in settings for a in ("--set", s)]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", str(run_dir), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["grad_norm"] > 0 and m["kl_to_base"] >= 0 for m in metrics)
    assert "approx_kl" not in metrics[0] or metrics[0]["approx_kl"] is None  # no log-probs
    blob = torch.load(run_dir / "checkpoints" / "epoch-0002" / OPTIMIZER_FILE, weights_only=True)
    old = blob["algorithm"]
    adapter = load_file(run_dir / "checkpoints" / "epoch-0002" / ADAPTER_FILE)
    assert len(old) == len(adapter) > 0
    trained = torch.cat([t.flatten() for t in adapter.values()])
    lagging = torch.cat([old[f"nft_old.{i}"].flatten() for i in range(len(old))])
    assert trained.numel() == lagging.numel() and torch.isfinite(lagging).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_an_nf4_sd3_transformer_goes_through_bitsandbytes_loading(sd3_dir):
    """`--vram` may pick a 4-bit base for SD 3 too: its transformer is loaded through
    bitsandbytes' path, which without CUDA refuses in one line."""
    from lowvram_ddpo.errors import UserError

    with pytest.raises(UserError, match="needs a CUDA GPU and bitsandbytes"):
        load_pipeline(str(sd3_dir), quantize="nf4")


def test_the_random_sd35_pipeline_for_gpu_measurements_is_an_sd3_pipeline():
    from lowvram_ddpo.architectures import random_pipeline

    pipe = random_pipeline("sd35m", torch.float16, device="meta")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.unet is pipe.transformer
    assert pipe.text_encoder_3 is None  # T5's tokenizer cannot be built offline


def test_flow_grpo_fast_trains_only_the_window_that_sampled(sd3_dir, tmp_path, monkeypatch):
    """sample.sde_window: each batch samples a window of 2 of its 4 steps (the ODE
    elsewhere), and every trained step is one of its window's."""
    from lowvram_ddpo.trainer import Trainer

    trained: list[torch.Tensor] = []
    original = Trainer.steps_to_train

    def spy(self, samples, indices, generator):  # noqa: ANN001, ANN202
        steps = original(self, samples, indices, generator)
        window = samples.action_steps[indices]
        assert all(set(s.tolist()) <= set(w.tolist()) for s, w in zip(steps, window, strict=True))
        trained.append(steps)
        return steps

    monkeypatch.setattr(Trainer, "steps_to_train", spy)
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    args = ["train", "--preset", str(preset), "--output", str(tmp_path / "run"),
            "--set", "sample.sde_window=2", "--set", "train.algorithm=grpo",
            "--set", "sample.group_size=4", "--log-with", "none"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert trained and all(s.shape[1] == 2 for s in trained)  # the whole window, each sample


@pytest.mark.parametrize(
    ("fraction", "sampler", "algorithm", "expected"),
    [
        (0.75, "flow-sde", "ddpo-is", {0, 1, 2}),
        (1.0, "flow-sde", "ddpo-is", {0, 1, 2}),
        (1.0, "flow-cps", "ddpo-is", {0, 1}),
        (1.0, "flow-cps", "nft", {0, 1, 2, 3}),
    ],
)
def test_a_flow_model_never_trains_a_sharp_last_step_by_policy_gradient(
    sd3_dir, tmp_path, monkeypatch, fraction, sampler, algorithm, expected
):
    """As Flow-GRPO: of 4 steps, 3 are trained (timestep_fraction 0.75, or 1: every step
    it may), never the last (sigma -> 0, a Gaussian too sharp for a reliable ratio); with
    CPS neither the last (it samples nothing) nor the one before (it lands on the last
    noise level). NFT re-noises final images: any step's noise level. One optimiser step
    per epoch in each case (the accumulation counts the steps actually trained)."""
    from lowvram_ddpo.trainer import Trainer

    trained: list[torch.Tensor] = []
    original = Trainer.steps_to_train
    monkeypatch.setattr(
        Trainer, "steps_to_train", lambda *a: trained.append(original(*a)) or trained[-1]
    )
    preset = tmp_path / "sd3.toml"
    preset.write_text(SD3_PRESET.format(model=sd3_dir))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--preset", str(preset), "--output", str(run_dir),
              "--epochs", "1", "--log-with", "none",
              "--set", f"train.timestep_fraction={fraction}",
              "--set", f"sample.sampler={sampler}", "--set", f"train.algorithm={algorithm}",
              "--set", f"sample.guidance_scale={1.0 if algorithm == 'nft' else 2.0}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    steps = torch.cat(trained)
    assert steps.shape[1] == len(expected)
    assert set(steps.flatten().tolist()) == expected
    [metrics] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["optimizer_steps"] == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.algorithm=nft", "trains flow-matching models"),
        ("sample.sde_window=2", "sample.sde_window (Flow-GRPO-Fast)"),
    ],
)
def test_flow_only_settings_are_refused_for_a_unet_model(tiny_preset, tmp_path, setting, message):
    result = CliRunner().invoke(
        app, ["train", "--preset", str(tiny_preset), "--set", setting,
              "--output", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
