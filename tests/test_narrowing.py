"""A decode or a reward model's scoring that runs out of GPU memory goes on narrower (a
decode then tiled) instead of ending the run (``memory/narrowing.py``). CUDA's
out-of-memory error is raised by a wrapped ``vae.decode`` or ``score`` here: the CPU has
no such error of its own."""

from __future__ import annotations

import pytest
import torch

from lowvram_ddpo.config import (
    RewardConfig,
    apply_overrides,
    load_config_file,
    load_preset,
    validate,
)
from lowvram_ddpo.memory.narrowing import NarrowingWidth
from lowvram_ddpo.rewards import ModelReward
from lowvram_ddpo.rollout import decode_latents
from lowvram_ddpo.trainer import Trainer


def _failing_above(vae, most: int, calls: list[int]) -> None:  # noqa: ANN001
    """``vae.decode`` raises CUDA's out-of-memory error for more than ``most`` latents
    at once (untiled), and records each call's size."""
    decode = vae.decode

    def decode_or_fail(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(len(latents))
        if len(latents) > most and not vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return decode(latents, *args, **kwargs)

    vae.decode = decode_or_fail


def _started_run(preset, folder, *overrides: str) -> Trainer:  # noqa: ANN001
    """A tiny one-epoch run, set up and started (its config.toml written), not trained."""
    config = load_preset(str(preset))
    apply_overrides(config, ["run.epochs=1", "run.progress=false", *overrides])
    validate(config)
    trainer = Trainer(config, folder / "run")
    trainer.setup()
    trainer.start_fresh()
    return trainer


def test_a_decode_out_of_memory_halves_its_width_and_gives_the_same_images(tiny_pipeline):
    vae = tiny_pipeline.vae
    z = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = decode_latents(vae, z, batch_size=1)
    calls: list[int] = []
    _failing_above(vae, 1, calls)
    width = NarrowingWidth(4, "memory.decode_batch")
    images = decode_latents(vae, z, batch_size=width)
    assert calls == [4, 2, 1, 1, 1, 1, 1, 1]  # 4 fails, 2 fails, then one at a time
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert width.width == 1
    notes = width.take_notes()
    assert len(notes) == 2 and "decoding images 4 at once: 2 at a time from now on" in notes[0]
    assert "--set memory.decode_batch=1" in notes[1]
    assert width.take_notes() == []  # each said once
    calls.clear()
    decode_latents(vae, z[:2], batch_size=width)  # the next call starts narrowed
    assert calls == [1, 1]


def test_one_image_that_does_not_fit_is_decoded_in_tiles_from_then_on(tiny_pipeline):
    """At one image the last resort is diffusers' tiling, where the image is larger than a
    tile (the tiny VAE's tile: 32 px; these latents decode to 64 px); an image no larger
    than a tile has no resort left: the error stands."""
    vae = tiny_pipeline.vae
    calls: list[int] = []
    _failing_above(vae, 0, calls)  # nothing fits untiled
    width = NarrowingWidth(2, "memory.decode_batch")
    large = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    images = decode_latents(vae, large, batch_size=width)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert vae.use_tiling and width.width == 1
    assert "tiles from now on" in width.take_notes()[-1]

    vae.disable_tiling()
    small = torch.randn(1, 4, 4, 4)  # 16 px: one tile already
    with pytest.raises(torch.OutOfMemoryError, match="memory.decode_batch=1"):
        decode_latents(vae, small, batch_size=NarrowingWidth(1, "memory.decode_batch"))
    assert not vae.use_tiling


def test_a_run_whose_decode_runs_out_of_memory_goes_on_and_keeps_the_narrower_width(
    tiny_preset, tmp_path, capsys
):
    """The trainer's decode narrows on out-of-memory and the epoch goes on: the run logs
    the change once and writes it to its config, so a resumed run starts narrow."""
    trainer = _started_run(tiny_preset, tmp_path, "memory.decode_batch=8")
    config = trainer.config
    calls: list[int] = []
    _failing_above(trainer.pipe.vae, 2, calls)
    _samples, rewards, _seconds = trainer.sample_and_score(epoch=0)
    assert len(rewards) == 16 and torch.isfinite(rewards).all()
    assert calls == [8, 4, 2, 2, 2, 2, 2, 2, 2, 2]  # the second batch starts at 2
    logged = capsys.readouterr().out
    assert logged.count("decode: out of GPU memory") == 2
    assert config.memory.decode_batch == 2
    saved = load_config_file(tmp_path / "run" / "config.toml")
    assert saved.memory.decode_batch == 2


def test_an_image_no_larger_than_a_tile_is_decoded_in_tiles_of_half_its_size():
    """SD 1.5's 512 px image is one 512 px tile: its last resort is tiles of half the
    image (here a 256 px image on a VAE of 512 px samples: 128 px tiles), not below
    128 px; the run's memory.vae_tiling (512 px tiles) is not claimed for it."""
    from tiny import tiny_vae

    from lowvram_ddpo.models import tiles_as_configured

    vae = tiny_vae(sample_size=512)
    calls: list[int] = []
    _failing_above(vae, 0, calls)
    width = NarrowingWidth(1, "memory.decode_batch")
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    images = decode_latents(vae, latents, batch_size=width)
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    assert vae.use_tiling and vae.tile_sample_min_size == 128
    assert "one 256 px image: decoding in 128 px tiles" in width.take_notes()[0]
    assert not tiles_as_configured(vae)


def test_the_last_resort_is_taken_once_and_the_error_keeps_cudas_words():
    """A call of one item that fails again after the last resort raises (no endless
    retries, whatever the resort says), with CUDA's own message; a last chunk of one
    that fails narrows the width to one first."""
    calls: list[int] = []

    def always_out_of_memory(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(len(chunk))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    width = NarrowingWidth(4, "memory.decode_batch")
    resorts: list[str] = []

    def resort() -> str:
        resorts.append("tiles")
        return "tiles from now on"

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 2.00 GiB.*=1"):
        width.map(torch.zeros(5, 2), always_out_of_memory, resort)
    assert calls == [4, 2, 1, 1] and resorts == ["tiles"] and width.width == 1
    last_of_one = NarrowingWidth(2, "memory.decode_batch")
    with pytest.raises(torch.OutOfMemoryError):
        last_of_one.map(torch.zeros(1, 2), always_out_of_memory)
    assert last_of_one.width == 1


def test_a_decode_given_a_number_lets_the_error_stand(tiny_pipeline):
    """A plain width (a benchmark's, a grid's) means what it says: no narrowing."""
    vae = tiny_pipeline.vae
    calls: list[int] = []
    _failing_above(vae, 1, calls)
    with pytest.raises(torch.OutOfMemoryError):
        decode_latents(vae, torch.randn(4, 4, 4, 4), batch_size=4)
    assert calls == [4] and not vae.use_tiling


def test_a_narrowing_is_kept_when_the_batch_then_fails(tiny_preset, tmp_path):
    """An error that gets out of the decode (one image does not fit, no tiles to fall
    back to) still leaves the narrowing it went through in the run's config."""
    trainer = _started_run(tiny_preset, tmp_path, "memory.decode_batch=4")
    _failing_above(trainer.pipe.vae, 0, [])  # 32 px images: one tile already
    with pytest.raises(torch.OutOfMemoryError):
        trainer.sample_and_score(epoch=0)
    assert load_config_file(tmp_path / "run" / "config.toml").memory.decode_batch == 1


def test_processes_agree_on_the_narrowest_decode_another_one_reached(
    tiny_preset, tmp_path, monkeypatch, capsys, memory_hungry_reward
):
    """With several processes each narrows alone; at the epoch's end all take the
    narrowest widths (a faked gather: another process decodes 1 at a time and scores 2),
    and the main one logs and saves them."""
    overrides = ["memory.decode_batch=4", "reward.name='test_memory_hungry'", "reward.batch_size=8"]
    trainer = _started_run(tiny_preset, tmp_path, *overrides)
    config = trainer.config
    acc = trainer.accelerator
    monkeypatch.setattr(type(acc), "num_processes", property(lambda self: 2))
    another = torch.tensor([[1, 0, 2]])  # decodes 1 at a time, no tiles, scores 2
    monkeypatch.setattr(acc, "gather", lambda mine: torch.cat([mine, another]))
    trainer.agree_on_narrowing()
    assert trainer.decode_width.width == 1 and config.memory.decode_batch == 1
    assert trainer.scoring_width().width == 2 and config.reward.batch_size == 2
    logged = capsys.readouterr().out
    assert "decode: out of GPU memory in another process" in logged
    assert "reward: out of GPU memory in another process" in logged
    saved = load_config_file(tmp_path / "run" / "config.toml")
    assert (saved.memory.decode_batch, saved.reward.batch_size) == (1, 2)
    trainer.agree_on_narrowing()  # nothing new: nothing said
    assert "another process" not in capsys.readouterr().out


class _MemoryHungryReward(ModelReward):
    """Mean brightness through a small network; more than ``most`` images at once run
    out of (simulated) GPU memory."""

    most = 2

    def __init__(self, config: RewardConfig, dtype: torch.dtype) -> None:
        self.batch_size = config.batch_size
        self.module = torch.nn.Linear(3, 1)
        self.calls: list[int] = []

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls.append(len(images))
        if len(images) > self.most:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return self.module(images.mean(dim=(2, 3))).squeeze(1)


@pytest.fixture
def memory_hungry_reward(monkeypatch):  # noqa: ANN001, ANN201
    """``reward.name = 'test_memory_hungry'`` for one test (the registry is shared: the
    `rewards` listing must not show it)."""
    from lowvram_ddpo.rewards import base

    entry = (_MemoryHungryReward, "brightness; out of memory above 2 images")
    monkeypatch.setitem(base._REGISTRY, "test_memory_hungry", entry)


def test_a_reward_model_scores_narrower_after_running_out_of_memory(
    tiny_preset, tmp_path, capsys, memory_hungry_reward
):
    """A reward model's scoring batch halves like the decode's (the same ``NarrowingWidth``):
    the rewards are those of one image at a time, the run logs the change and keeps
    reward.batch_size in its config."""
    overrides = ("reward.name='test_memory_hungry'", "reward.batch_size=8")
    trainer = _started_run(tiny_preset, tmp_path, *overrides)
    config = trainer.config
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    trainer.reward_fn.calls.clear()  # setup's own check of the reward
    rewards = trainer.score(images, ["a cat"] * 6)
    assert trainer.reward_fn.calls == [6, 3, 2, 2, 2]  # 6 fail, 3 fail (halved up), 2s
    alone = torch.cat([trainer.reward_fn.score(image[None], ["a cat"]) for image in images])
    torch.testing.assert_close(rewards, alone.detach())
    logged = capsys.readouterr().out
    assert "reward: out of GPU memory scoring images 6 at once: 3 at a time" in logged
    assert "scoring images 3 at once: 2 at a time" in logged
    assert config.reward.batch_size == 2
    assert load_config_file(tmp_path / "run" / "config.toml").reward.batch_size == 2


def test_the_sample_command_tiles_a_decode_that_runs_out_of_memory_and_says_so(
    tiny_model_dir, monkeypatch
):
    """`lowvram-ddpo sample` decodes through a narrowing width too: where one image does
    not fit (here: any untiled decode, 64 px images on the tiny VAE's 32 px tiles), it
    renders in tiles and its report says so."""
    from diffusers import AutoencoderKL

    from lowvram_ddpo.sampling import SampleRequest, render_comparison

    decode = AutoencoderKL.decode

    def decode_or_fail(self, latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not self.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", decode_or_fail)
    request = SampleRequest(
        ["a cat"], [0], model=str(tiny_model_dir), steps=2, resolution=64, progress=False
    )
    result = render_comparison(request)
    assert result.panels["base model"].shape[-1] == 64
    assert any("decode: out of GPU memory decoding one image" in line for line in result.notes)
    assert result.notes[0] in result.report_lines()


def test_the_sample_command_tiles_as_the_run_did(tiny_preset, tiny_model_dir, monkeypatch):
    """A run that trained with memory.vae_tiling renders its grids tiled too (the images
    its rewards saw); a model without a run, untiled."""
    import lowvram_ddpo.sampling as sampling

    run = load_preset(str(tiny_preset))
    apply_overrides(run, ["memory.vae_tiling=true"])
    asked: list[bool] = []
    real = sampling.use_vae_tiling
    monkeypatch.setattr(
        sampling, "use_vae_tiling", lambda vae, on: asked.append(on) or real(vae, on)
    )
    request = sampling.SampleRequest(["a cat"], [0], steps=2, progress=False)
    for found, expected in ((run, True), (None, False)):
        monkeypatch.setattr(sampling, "_run_config_for", lambda lora, found=found: found)
        request.model = "" if found else str(tiny_model_dir)
        sampling.render_comparison(request)
        assert asked.pop() is expected


def test_a_mixed_reward_counts_each_part_once_when_a_part_runs_out_of_memory():
    """``reward.mix``: a part that runs out of memory midway has the call scored again,
    narrower; the parts scored before it are not counted twice in their logged means."""
    from lowvram_ddpo.rewards import build_reward
    from lowvram_ddpo.rewards.mix import MixedReward

    mix = {"jpeg_incompressibility": 1.0, "test_memory_hungry": 1.0}
    config = RewardConfig(name="mix", mix=mix, batch_size=4)
    jpeg = build_reward("jpeg_incompressibility")
    parts = {
        "jpeg_incompressibility": jpeg,
        "test_memory_hungry": _MemoryHungryReward(config, None),
    }
    reward = MixedReward(config, torch.float32, parts)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    reward(images, ["a cat"] * 4)
    assert reward.scoring_width().width == 2  # 4 ran out of memory, then 2 at a time
    means = reward.extra_metrics()
    jpeg_mean = next(v for k, v in means.items() if "jpeg" in k)
    assert jpeg_mean == pytest.approx(jpeg(images, ["a cat"] * 4).mean().item(), rel=1e-5)


def test_a_benchmark_reports_the_decode_width_its_run_narrowed_to(monkeypatch):
    """`bench speed` on the pocket model with a decode that runs out of memory above one
    image: the run goes on, and the report's settings give the width it ended with."""
    import json

    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from lowvram_ddpo.cli import app

    decode = AutoencoderKL.decode

    def decode_or_fail(self, latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if len(latents) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return decode(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", decode_or_fail)
    result = CliRunner().invoke(
        app,
        ["bench", "speed", "--preset", "pocket-incompressibility", "--batches", "1",
         "--set", "sample.num_steps=2", "--set", "sample.batch_size=4",
         "--set", "train.batch_size=4", "--set", "train.gradient_accumulation_steps=1",
         "--set", "memory.decode_batch=4", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["decode_batch"] == 1  # 4 -> 2 -> 1
