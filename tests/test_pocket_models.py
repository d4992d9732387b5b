"""The shipped pocket models: they load with diffusers' own pipeline classes from the
installed package and draw what their prompts ask for, above a stated floor."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from lowvram_ddpo.models import POCKET_DIR, load_pipeline
from lowvram_ddpo.pocket import world
from lowvram_ddpo.pocket.classifier import load_classifier, prompt_accuracy
from lowvram_ddpo.policy import DDIMPolicy, FlowSDEPolicy
from lowvram_ddpo.rollout import sample_trajectories
from lowvram_ddpo.text_encoding import encode_negative

SD_FLOOR = 0.6  # shape and colour both right; README states the measured figure
LCM_FLOOR = 0.5
FLOW_FLOOR = 0.5

pytestmark = pytest.mark.skipif(
    not (POCKET_DIR / "pocket-sd" / "model_index.json").is_file(), reason="pocket not built"
)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(POCKET_DIR / "world_classifier.safetensors")


def _captions() -> list[str]:
    return world.all_captions()[::2]  # 80 prompts, every shape, colour and background


def test_pocket_loads_with_diffusers_and_draws_its_prompts(classifier):
    pipe = StableDiffusionPipeline.from_pretrained(POCKET_DIR / "pocket-sd", dtype=torch.float32)
    assert pipe.unet.config.sample_size * 4 == world.SIZE
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=20, eta=1.0)
    negative = encode_negative(pipe, "")
    captions = _captions()
    with torch.no_grad():
        images = sample_trajectories(
            pipe,
            pipe.unet,
            policy,
            captions,
            negative,
            5.0,
            world.SIZE,
            torch.Generator().manual_seed(0),
        ).images
    assert prompt_accuracy(classifier, images, captions) >= SD_FLOOR


def test_pocket_alias_goes_through_the_ordinary_loader():
    pipe = load_pipeline("pocket")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32  # shipped in fp16, loaded in the dtype asked for


@pytest.mark.skipif(not (POCKET_DIR / "pocket-lcm").is_dir(), reason="pocket LCM not built")
def test_pocket_lcm_draws_its_prompts_in_four_steps(classifier):
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        POCKET_DIR / "pocket-lcm", dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim is not None
    captions = _captions()
    images = pipe(
        captions,
        num_inference_steps=4,
        guidance_scale=6.0,
        height=world.SIZE,
        width=world.SIZE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert prompt_accuracy(classifier, images, captions) >= LCM_FLOOR


@pytest.mark.skipif(not (POCKET_DIR / "pocket-flow").is_dir(), reason="pocket flow not built")
def test_pocket_flow_loads_with_diffusers_sd3_and_draws_its_prompts(classifier):
    """The pocket flow model is an SD 3 pipeline (no T5) that diffusers' own
    StableDiffusion3Pipeline loads; sampled as Flow-GRPO samples (10 SDE steps)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(
        POCKET_DIR / "pocket-flow", text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    ours = load_pipeline("pocket-flow")
    policy = FlowSDEPolicy(ours.scheduler.config, num_steps=10)
    captions = _captions()
    with torch.no_grad():
        images = sample_trajectories(
            ours, ours.unet, policy, captions, encode_negative(ours, ""), 4.5, world.SIZE,
            torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        plain = pipe(
            captions[:8], num_inference_steps=10, guidance_scale=4.5, height=world.SIZE,
            width=world.SIZE, max_sequence_length=16, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
    assert prompt_accuracy(classifier, images, captions) >= FLOW_FLOOR
    assert prompt_accuracy(classifier, plain, captions[:8]) >= FLOW_FLOOR - 0.2  # the ODE


def _readme_block(marker: str) -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    [block] = [b for b in blocks if marker in b]
    return block


def test_the_readme_snippet_runs_in_plain_diffusers_as_written(classifier, tmp_path, monkeypatch):
    """The pocket folder loads in plain diffusers in one dtype (its text encoder was once
    fp16 beside an fp32 UNet: a dtype error) and draws the prompt."""
    monkeypatch.chdir(tmp_path)
    exec(_readme_block("pocket_folder("), {})  # noqa: S102  (our own README)
    image = Image.open(tmp_path / "pocket.png").convert("RGB")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    assert pixels.shape == (1, 3, 32, 32)
    [predicted] = classifier.predict(pixels)
    assert (predicted["shape"], predicted["color"]) == ("circle", "red"), predicted
