"""The memory levers inside a real (tiny, CPU) training run: offloading, the optimiser
fallback, quantisation and xformers errors, and what a CUDA out-of-memory error leaves."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowvram_ddpo.cli import app
from lowvram_ddpo.config import (
    TrainConfig,
    apply_overrides,
    load_config_file,
    load_preset,
    validate,
)
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import load_pipeline, use_attention
from lowvram_ddpo.optimizers import build_optimizer
from lowvram_ddpo.trainer import Trainer


def _config(preset: Path, *overrides: str):
    config = load_preset(str(preset))
    apply_overrides(config, ["run.epochs=1", *overrides])
    validate(config)
    return config


def test_offloaded_models_are_off_the_device_while_training(tiny_preset, tmp_path, monkeypatch):
    seen: dict[str, set[str]] = {}
    original = Trainer.train_on

    def spy(self, samples, signal, epoch):  # noqa: ANN001, ANN202
        seen["training"] = set(self.offloader.resident)
        return original(self, samples, signal, epoch)

    monkeypatch.setattr(Trainer, "train_on", spy)
    trainer = Trainer(_config(tiny_preset, "memory.offload=true"), tmp_path / "on")
    trainer.fit()
    assert seen["training"] == {"unet"}
    trainer = Trainer(_config(tiny_preset, "memory.offload=false"), tmp_path / "off")
    trainer.fit()
    assert seen["training"] == {"unet", "text_encoder", "vae"}


def test_a_module_whose_forward_updates_its_buffers_still_moves_both_ways():
    from lowvram_ddpo.offload import HostWeights

    module = _frozen_module()
    assert HostWeights.can_keep(module)
    assert not HostWeights.can_keep(module.train())  # BatchNorm's running statistics


def test_offloader_moves_a_trainable_module_both_ways():
    from lowvram_ddpo.offload import Offloader

    moves: list[str] = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))  # trainable: must come back

        def to(self, device):  # noqa: ANN001, ANN202
            moves.append(str(device))
            return self

    offloader = Offloader(torch.device("cuda"), enabled=True)
    offloader.register("vae", Recorder())
    assert moves == ["cpu"] and offloader.resident == set()
    with offloader.loaded("vae"):
        assert offloader.resident == {"vae"} and moves[-1] == "cuda"
    assert moves[-1] == "cpu" and offloader.resident == set()
    moves.clear()
    offloader.register("text_encoder", Recorder(), on_cpu=True)  # runs where it is
    with offloader.loaded("text_encoder"):
        assert moves == ["cpu"] and offloader.resident == set()
    assert moves == ["cpu"]


def _frozen_module() -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Sequential(  # 3 wide: tensors of 36 and 12 bytes, not powers of two
        torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3)
    )
    module[2].weight = module[0].weight  # tied, as some text encoders' embeddings are
    module[2].register_buffer("mean", module[1].running_mean)  # a tied buffer
    return module.requires_grad_(False).eval()


def test_a_frozen_module_visits_without_a_copy_back():
    """The visit copies the weights in; the return points the module at its host copy
    (no copy out, no new host memory), and the same Parameter objects are kept."""
    from lowvram_ddpo.offload import Offloader

    module = _frozen_module()
    x = torch.randn(3, 3)
    expected = module(x)
    offloader = Offloader(torch.device("cpu"), enabled=True)  # copies on the CPU stand in
    offloader.register("vae", module)
    params = list(module.parameters())
    host = [t.data_ptr() for t in (*params, *module.buffers())]
    with offloader.loaded("vae") as loaded:
        assert offloader.resident == {"vae"}
        visiting = [t.data_ptr() for t in (*params, *loaded.buffers())]
        assert not set(visiting) & set(host)  # its own copy of every tensor
        assert module[2].weight is module[0].weight
        assert module[2].mean is module[1].running_mean  # tied on the device too: one copy
        assert torch.equal(loaded(x), expected)
        module[0].weight.data.zero_()  # what a copy back would carry home
    assert offloader.resident == set()
    assert list(module.parameters()) == params
    assert [t.data_ptr() for t in (*params, *module.buffers())] == host
    assert torch.equal(module(x), expected)
    assert offloader.pinned_bytes == 0  # pinned for CUDA only


def test_the_offloader_pins_host_copies_up_to_its_limit(monkeypatch):
    import lowvram_ddpo.offload as offload

    pinned: dict[int, int] = {}  # data_ptr: bytes of the copies "pinned"

    def fake_pin(tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        pinned[copy.data_ptr()] = copy.nbytes
        return copy

    monkeypatch.setattr(offload, "_pinned", fake_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: self.data_ptr() in pinned)
    module = _frozen_module()
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    size = sum(offload.pinned_size(t.nbytes) for t in tensors)  # blocks of powers of two
    assert size > sum(t.nbytes for t in tensors)
    monkeypatch.setattr(offload, "PINNED_HOST_LIMIT", size + size // 2)
    offloader = offload.Offloader(torch.device("cuda"), enabled=True)
    offloader.register("vae", module)
    offloader.register("text_encoder", _frozen_module())  # over the limit: not pinned
    assert len(pinned) == len(tensors) and offloader.pinned_bytes == size
    assert offload.pinned_size(1000) == 1024 and offload.pinned_size(1024) == 1024


def test_the_offload_benchmark_times_both_visits(monkeypatch, capsys):
    """benchmarks/offload_visit.py (a GPU session's measure of the offloaded visits) on
    the pocket model: a row per module, both ways timed, weights back on the host."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import offload_visit

    monkeypatch.setattr(sys, "argv", ["offload_visit.py", "--arch", "pocket", "--repeats", "1"])
    offload_visit.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["module"] for row in rows] == ["vae", "text_encoder"]
    for row in rows:
        assert row["megabytes"] > 0 and row["ms_round_trip"] > 0 and row["ms_copy_in"] > 0
        assert not row["pinned"]  # pinned for CUDA only


def test_the_vae_decodes_decode_batch_images_per_call_with_the_same_images(tiny_pipeline):
    from lowvram_ddpo.rollout import decode_latents

    vae = tiny_pipeline.vae
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    decode = vae.decode

    def counted(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(len(latents))
        return decode(latents, *args, **kwargs)

    vae.decode = counted
    one = decode_latents(vae, z)
    assert calls == [1, 1, 1, 1, 1]
    calls.clear()
    two = decode_latents(vae, z, batch_size=2)
    assert calls == [2, 2, 1] and two.shape == one.shape
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)


def test_a_run_decodes_its_batches_memory_decode_batch_at_a_time(tiny_preset, tmp_path):
    trainer = Trainer(_config(tiny_preset, "memory.decode_batch=4"), tmp_path / "run")
    trainer.setup()
    calls: list[int] = []
    decode = trainer.pipe.vae.decode

    def counted(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(len(latents))
        return decode(latents, *args, **kwargs)

    trainer.pipe.vae.decode = counted
    trainer.sample_and_score(epoch=0)
    assert calls == [4, 4, 4, 4]  # two sampling batches of 8
    # a decode narrows itself before an error gets out (test_decode_narrowing.py)
    trainer.phase = "sampling"
    assert "memory.decode_batch" not in trainer.out_of_memory_message(0)
    with pytest.raises(UserError, match="memory.decode_batch must be at least 1"):
        _config(tiny_preset, "memory.decode_batch=0")


def test_a_run_keeps_the_levels_it_is_told_out_of_checkpointing(tiny_preset, tmp_path):
    """memory.uncheckpointed_levels reaches the trainer's UNet: its lowest-resolution
    level runs without checkpoints, the outer one with them, and it trains; the
    out-of-memory advice turns the levels back into checkpointing."""
    config = _config(
        tiny_preset, "memory.gradient_checkpointing=true", "memory.uncheckpointed_levels=1"
    )
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    unet = trainer.pipe.unet
    assert (
        not unet.mid_block.gradient_checkpointing
        and not unet.down_blocks[-1].gradient_checkpointing
    )
    assert unet.down_blocks[0].gradient_checkpointing and unet.up_blocks[-1].gradient_checkpointing
    samples, signal, _ = trainer.sample_and_score(epoch=0)
    before = [p.detach().clone() for p in trainer.params]
    trainer.train_on(samples, signal, 0)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params, strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.params)
    trainer.phase = "training"
    assert "--set memory.uncheckpointed_levels=0 " in trainer.out_of_memory_message(0)
    # every level of the tiny UNet (2) kept out is refused before the models load
    every = _config(
        tiny_preset, "memory.gradient_checkpointing=true", "memory.uncheckpointed_levels=2"
    )
    refused = Trainer(every, tmp_path / "every")
    refused.load_models = lambda dtype: pytest.fail("loaded before refusing")  # noqa: ARG005
    with pytest.raises(UserError, match="has 2 levels: keeping them all is no checkpointing"):
        refused.setup()


def test_train_asks_whether_compiling_pays_for_a_new_run_only(tiny_preset, tmp_path, monkeypatch):
    """The train command weighs a preset's compile against the run's length once, when the
    run starts (``compile_where_it_pays``), and says what it decided; a resumed run keeps
    what it started with."""
    import lowvram_ddpo.memory.fit as fit

    asked: list[str] = []

    def decided(config, held):  # noqa: ANN001, ANN202
        asked.append(config.speed.compile)
        return config, "the compile decision"

    monkeypatch.setattr(fit, "compile_where_it_pays", decided)
    run_dir = tmp_path / "run"
    args = ["train", "--preset", str(tiny_preset), "--output", str(run_dir), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert asked == ["off"] and "the compile decision" in result.output
    resumed = ["train", "--resume", str(run_dir), "--epochs", "2", "--no-progress"]
    result = CliRunner().invoke(app, resumed)
    assert result.exit_code == 0, result.output
    assert asked == ["off"] and "the compile decision" not in result.output


def test_the_decode_benchmark_times_each_width(monkeypatch, capsys):
    """benchmarks/decode_batch.py (a GPU session's measure of memory.decode_batch) on the
    pocket model: a row per width, the first the unit of the speed-ups, each with the
    memory estimate's working peak (growing with the width; measured beside it on a GPU)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import decode_batch

    argv = ["decode_batch.py", "--arch", "pocket", "--images", "4", "--widths", "1,4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1"])
    decode_batch.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["decode_batch"] for row in rows] == [1, 4]
    assert rows[0]["speed_up"] == 1.0 and all(row["ms_per_image"] > 0 for row in rows)
    estimated = [row["estimated_working_bytes"] for row in rows]
    assert 0 < estimated[0] < estimated[1]  # four images at once hold more than one
    calibrated = [row["calibrated_working_bytes"] for row in rows]
    assert calibrated == estimated  # an fp32 decode on the CPU: as the meta device counts


def test_the_decode_benchmark_times_a_compiled_decoder_beside_eager(
    fresh_dynamo, monkeypatch, capsys, tmp_path
):
    """``--variants eager,compiled``: the compiled row (speed.compile_decoder) carries the
    eager row's time and how far its images lie from eager's (fp32 on the CPU: roundings)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import decode_batch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["decode_batch.py", "--arch", "pocket", "--images", "4", "--widths", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--variants", "eager,compiled"])
    decode_batch.main()
    eager, compiled = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (eager["variant"], compiled["variant"]) == ("eager", "compiled")
    assert compiled["eager_ms_per_image"] == eager["ms_per_image"]
    assert 0 <= compiled["max_abs_difference"] < 1e-4
    assert (eager["graphs_compiled"], compiled["graphs_compiled"]) == (0, 1)


def test_a_run_encodes_its_prompts_in_one_visit_before_sampling(tiny_preset, tmp_path):
    """Every prompt (and grid prompt) is encoded during setup, in the text encoders' one
    visit; sampling then never loads them, and the embeddings are what sampling would have
    encoded itself. Text encoders on the CPU encode as prompts arrive."""
    from lowvram_ddpo.text_encoding import encode_text

    trainer = Trainer(_config(tiny_preset, "memory.offload=true"), tmp_path / "run")
    trainer.setup()
    prompts = trainer.prompts + trainer.config.run.grid_prompts
    assert trainer.prompt_cache.missing(prompts) == [] and len(trainer.prompt_cache) == 2
    visits: list[str] = []
    loaded = trainer.offloader.loaded

    def counted(name: str):  # noqa: ANN202
        visits.append(name)
        return loaded(name)

    trainer.offloader.loaded = counted
    trainer.sample_and_score(epoch=0)
    assert "text_encoder" not in visits and "vae" in visits
    with torch.no_grad(), trainer.accelerator.autocast():  # as sampling encodes
        alone = encode_text(trainer.pipe, ["a dog"]).hidden[0]
    assert torch.equal(trainer.prompt_cache.cached(["a dog"]).hidden[0], alone)
    on_cpu = Trainer(_config(tiny_preset, "memory.text_encoders_on_cpu=true"), tmp_path / "cpu")
    on_cpu.setup()
    assert len(on_cpu.prompt_cache) == 0


def test_a_long_prompt_list_is_encoded_as_drawn_and_the_grids_first(
    tiny_preset, tmp_path, monkeypatch
):
    monkeypatch.setattr("lowvram_ddpo.trainer.ENCODED_FIRST", 1)  # the tiny list: 2
    trainer = Trainer(_config(tiny_preset, "run.grid_prompts=['a fox']"), tmp_path / "run")
    trainer.setup()
    assert trainer.prompts_to_encode_first() == ["a fox"]
    assert trainer.prompt_cache.missing(["a fox", "a cat", "a dog"]) == ["a cat", "a dog"]


def test_the_time_model_check_follows_the_first_warmed_epoch_of_a_users_run(
    tiny_preset, tmp_path, monkeypatch
):
    trainer = Trainer(_config(tiny_preset), tmp_path / "run")
    trainer.setup()
    trainer.meter.cuda = True  # as on a GPU (only the flag: no phase is measured here)
    assert [trainer.checks_time_model(e, 0) for e in range(3)] == [False, True, False]
    assert trainer.checks_time_model(5, 4)  # resumed at epoch 4: its second epoch
    monkeypatch.setenv("WORLD_SIZE", "2")  # several GPUs: no fit to check
    assert not trainer.checks_time_model(1, 0)
    monkeypatch.delenv("WORLD_SIZE")
    trainer.pipeline = trainer.pipe  # a benchmark's pipeline: it reports its own
    assert not trainer.checks_time_model(1, 0)


def test_the_memory_check_puts_each_phases_peak_beside_the_estimate(tiny_preset):
    """After the warmed epoch a run on a CUDA card prints its measured peaks beside the
    estimate of its settings, and asks to be reported where the peak is well above it
    (made-up peaks on the tiny model's estimate); nothing without CUDA figures."""
    from lowvram_ddpo.memory.check import memory_check_line
    from lowvram_ddpo.memory.estimate import estimate_memory, readable_shape

    config = _config(tiny_preset)
    estimate = estimate_memory(config, readable_shape(config, config.model.name)[0])
    expected = {p.name: p.peak_reserved for p in estimate.phases}
    peaks = {
        "peak_reserved_bytes_sampling": 2 * estimate.peak_bytes,  # twice the run's estimate
        "peak_allocated_bytes_sampling": estimate.peak_bytes,
        "peak_reserved_bytes_training": expected["training"],
        "peak_allocated_bytes_training": expected["training"],
    }
    line = memory_check_line(config, peaks)
    assert line.startswith("memory check: peak ") and " reserved in sampling against " in line
    assert "(2.00)" in line and line.endswith("please report the line")
    peaks["peak_reserved_bytes_sampling"] = expected["sampling"]
    assert "please report" not in memory_check_line(config, peaks)  # at or under: nothing asked
    assert memory_check_line(config, {}) == ""


def test_text_encoders_on_the_cpu_are_fp32_and_never_loaded(tiny_preset, tmp_path):
    trainer = Trainer(_config(tiny_preset, "memory.text_encoders_on_cpu=true"), tmp_path / "run")
    trainer.setup()
    assert trainer.pipe.text_encoder.dtype == torch.float32
    assert trainer.negative.hidden.dtype == torch.float32
    with trainer.offloader.loaded("text_encoder"):
        assert "text_encoder" not in trainer.offloader.resident


def test_8_bit_adam_falls_back_with_a_notice_without_cuda(capsys):
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, kind = build_optimizer(params, TrainConfig(), "adamw8bit")
    assert kind == "adamw" and isinstance(optimizer, torch.optim.AdamW)
    assert "8-bit AdamW needs bitsandbytes" in capsys.readouterr().out
    _, kind = build_optimizer(params, TrainConfig(), "adamw")
    assert kind == "adamw" and capsys.readouterr().out == ""


def test_8_bit_adam_is_used_when_bitsandbytes_can_run(monkeypatch):
    made = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **options):  # noqa: ANN001, ANN003
            made.update(options)
            super().__init__(params, **options)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr("lowvram_ddpo.optimizers.bitsandbytes_usable", lambda: True)
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, kind = build_optimizer(params, TrainConfig(), "adamw8bit")
    assert kind == "adamw8bit" and isinstance(optimizer, FakeAdamW8bit)
    assert made["lr"] == TrainConfig().learning_rate


def test_quantised_base_without_cuda_is_a_clear_error(tiny_model_dir):
    with pytest.raises(UserError, match="memory.quantize=nf4 needs a CUDA GPU and bitsandbytes"):
        load_pipeline(str(tiny_model_dir), quantize="nf4")


def test_xformers_missing_is_a_clear_error(tiny_pipeline):
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="lowvram-ddpo\\[xformers\\]"):
            use_attention(tiny_pipeline.unet, "xformers")
    else:  # pragma: no cover
        pytest.skip("xformers is installed here")
    use_attention(tiny_pipeline.unet, "sdpa")  # the default needs nothing


def test_out_of_memory_says_what_to_change_and_keeps_the_checkpoint(
    tiny_preset, tmp_path, monkeypatch
):
    original = Trainer.train_on

    def run_out_in_the_second_epoch(self, samples, signal, epoch):  # noqa: ANN001, ANN202
        if epoch == 1:  # the loop's index: epoch 2 as the user counts
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, samples, signal, epoch)

    monkeypatch.setattr(Trainer, "train_on", run_out_in_the_second_epoch)
    run_dir = tmp_path / "run"
    args = ["train", "--preset", str(tiny_preset), "--output", str(run_dir), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "out of GPU memory while training in epoch 2" in result.output
    assert "checkpoint epoch-0001 is kept" in result.output
    assert f"--resume {run_dir} --vram" in result.output
    # a size below the card's: the card's own size would fit the same settings again
    from lowvram_ddpo.trainer import _smaller_budget

    card = types.SimpleNamespace(total_memory=int(7.6 * 2**30))  # an "8 GB" card
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    assert _smaller_budget(torch.device("cuda")) == "7GB"
    if not torch.cuda.is_available():
        assert "--vram <a size below your card's, e.g. 7GB>` picks the settings" in result.output
    assert "Traceback" not in result.output
    assert json.loads((run_dir / "latest.json").read_text())["epochs_done"] == 1

    # what the message proposes by hand works on resume: the micro-batch is a memory lever
    assert "by hand, add --set train.batch_size=4 --set memory.gradient_checkpointing=true" in (
        result.output
    )
    monkeypatch.setattr(Trainer, "train_on", original)
    resume = ["train", "--resume", str(run_dir), "--no-progress", "--set"]
    result = CliRunner().invoke(app, [*resume, "train.batch_size=3"])
    assert result.exit_code == 2 and "does not divide the 16 samples" in result.output
    result = CliRunner().invoke(app, [*resume, "train.learning_rate=1"])
    assert result.exit_code == 2 and "cannot change a run being resumed" in result.output
    result = CliRunner().invoke(  # speed levers too (CUDA graphs off after running out)
        app,
        [*resume, "memory.offload=false", "--set", "train.batch_size=4", "--set",
         "speed.compile=off"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [1, 2]
    saved = load_config_file(run_dir / "config.toml").train  # the step's 16 samples kept
    assert (saved.batch_size, saved.gradient_accumulation_steps) == (4, 4)


def test_half_decode_decodes_outside_autocast_and_the_estimate_counts_it(
    tiny_pipeline, tiny_preset, tmp_path, monkeypatch
):
    """speed.half_decode: the VAE decodes with autocast off (its own dtype, as diffusers'
    SD 1.5 pipeline), the trainer asks it of every decode (sampling and grids), and the
    estimate counts its smaller working memory (CUDA autocast's float32 norms gone)."""
    import lowvram_ddpo.rollout as rollout
    from lowvram_ddpo.memory.estimate import meta_run, settings_of

    vae = tiny_pipeline.vae
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    autocast_inside: list[bool] = []
    decode = vae.decode

    def spy(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        autocast_inside.append(torch.is_autocast_enabled("cpu"))
        return decode(latents, *args, **kwargs)

    vae.decode = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rollout.decode_latents(vae, z, batch_size=2)
        rollout.decode_latents(vae, z, batch_size=2, own_dtype=True)
    assert autocast_inside == [True, False]

    asked: list[bool] = []
    real = rollout.decode_latents

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(kwargs.get("own_dtype", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(rollout, "decode_latents", recorded)
    config = _config(tiny_preset, "speed.half_decode=true")
    assert settings_of(config)["half_decode"] is True
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    trainer.sample_and_score(epoch=0)
    trainer.render_to_view(["a cat"], [0])
    assert len(asked) == 3 and all(asked)  # two sampling batches and a grid image

    fp16 = load_preset("incompressibility")
    fp16.model.mixed_precision = "fp16"
    run = meta_run(fp16, "sd15")
    own, autocast = run.decode(False, 2, own_dtype=True), run.decode(False, 2)
    assert own < 0.7 * autocast  # counted: 0.60 of it at 512 px


def test_a_half_decode_that_overflows_is_decoded_again_under_autocast(tiny_pipeline):
    """Some fine-tuned VAEs overflow in fp16 (NaN pixels): speed.half_decode then decodes
    those latents again as without it, and warns."""
    from lowvram_ddpo.rollout import decode_latents

    vae = tiny_pipeline.vae
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = decode_latents(vae, z, batch_size=2)
    decode = vae.decode

    def overflowing(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = decode(latents, *args, **kwargs)
        if not torch.is_autocast_enabled("cpu"):  # the own-dtype decode
            out.sample[0, 0, 0, 0] = float("nan")
        return out

    vae.decode = overflowing
    overflow = pytest.warns(UserWarning, match="speed.half_decode: .* gave NaN pixels")
    with torch.autocast("cpu", dtype=torch.bfloat16), overflow:
        images = decode_latents(vae, z, batch_size=2, own_dtype=True)
    assert torch.equal(images, expected)
