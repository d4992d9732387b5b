"""``speed.compile_decoder``: the VAE's decoder compiled for the run's decode only."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_vae
from torch._dynamo.utils import counters

from lowvram_ddpo.config import apply_overrides, load_preset
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.rollout import decode_latents
from lowvram_ddpo.speed import compile_decoder as decoder_compiling
from lowvram_ddpo.speed.compile_decoder import DecodeShape, check_decoder_compiler, compile_decoder


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_decoder_compiles_for_the_runs_decode_and_decodes_other_shapes_eagerly(
    fresh_dynamo, tmp_path, monkeypatch
):
    """Decodes of the run's shape (2 images of 32 px: 8x8 latents for this 4x VAE) go
    through one compiled graph, within float32's roundings of eager's pixels, and say
    once how long they compiled; one image at a time (a narrowed decode) compiles
    nothing and is eager's bit for bit."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    latents = torch.randn(4, 4, 8, 8)
    eager_pairs = decode_latents(vae, latents, batch_size=2)
    eager_ones = decode_latents(vae, latents, batch_size=1)
    heard: list[str] = []
    shape = DecodeShape.of_run(vae, decode_batch=2, sampling_batch=4, resolution=32)
    assert shape == DecodeShape(images=2, side=8)
    line = compile_decoder(vae, torch.device("cpu"), shape, say=heard.append)
    assert line.startswith("speed.compile_decoder: the VAE's decoder compiles at the first")

    before = graphs()
    compiled_pairs = decode_latents(vae, latents, batch_size=2)
    assert graphs() == before + 1  # two calls of the run's shape: one graph
    assert torch.allclose(compiled_pairs, eager_pairs, atol=1e-5, rtol=0)
    assert len(heard) == 1 and heard[0].startswith(
        "speed.compile_decoder=true: the VAE's decoder compiled in "
    ), heard

    narrowed = decode_latents(vae, latents, batch_size=1)
    assert graphs() == before + 1  # another shape: eager, no compile
    assert torch.equal(narrowed, eager_ones)
    assert len(heard) == 1


def test_the_runs_decode_compiles_where_the_unets_calls_run_eagerly(fresh_dynamo):
    """Under ``speed.compile=cudagraphs`` without graph_sampling the sampling batch (its
    decode included) runs inside ``uncompiled_calls``: the decoder's own setting still
    compiles the run's decode there (here with dynamo's plain ``eager`` backend)."""
    from lowvram_ddpo.speed.compile import uncompiled_calls

    vae = tiny_vae().eval()
    compile_decoder(vae, torch.device("cpu"), DecodeShape(2, 8), say=print, backend="eager")
    before = graphs()
    with uncompiled_calls("cudagraphs"):
        decode_latents(vae, torch.randn(2, 4, 8, 8), batch_size=2)
    assert graphs() == before + 1


def test_a_decoder_that_fails_to_compile_decodes_eagerly_with_one_line(fresh_dynamo):
    from torch._dynamo import register_backend

    def no_kernels(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("no kernels for this card")

    register_backend(no_kernels, name="lowvram_ddpo_no_decoder_kernels")
    vae = tiny_vae().eval()
    latents = torch.randn(2, 4, 8, 8)
    expected = decode_latents(vae, latents, batch_size=2)
    heard: list[str] = []
    compile_decoder(
        vae, torch.device("cpu"), DecodeShape(2, 8), heard.append, "lowvram_ddpo_no_decoder_kernels"
    )
    for _ in range(2):
        assert torch.equal(decode_latents(vae, latents, batch_size=2), expected)
    assert len(heard) == 1, heard
    assert heard[0].startswith("speed.compile_decoder=true: compiling the VAE's decoder failed")
    assert "no kernels for this card" in heard[0]
    assert "--set speed.compile_decoder=false skips the attempt" in heard[0]
    assert vae.decoder._compiled_call_impl is None


def test_a_run_that_decodes_in_tiles_compiles_no_decoder():
    """Tiles never have the run's shape: the line says nothing compiles."""
    from lowvram_ddpo.models import use_vae_tiling

    vae = tiny_vae()
    use_vae_tiling(vae, True, 16)  # 32 px images in 16 px tiles
    line = compile_decoder(vae, torch.device("cpu"), DecodeShape(2, 8), say=print)
    assert line.startswith("speed.compile_decoder: this run decodes in tiles")
    assert vae.decoder._compiled_call_impl is None


def test_a_decoder_compile_this_machine_cannot_run_is_refused_in_one_line(monkeypatch):
    check_decoder_compiler(True, torch.device("cpu"))  # a C++ compiler is here
    monkeypatch.setattr(decoder_compiling, "inductor_missing", lambda device: "a C++ compiler")
    check_decoder_compiler(False, torch.device("cpu"))  # not asked for: no error
    with pytest.raises(
        UserError,
        match=r"^speed.compile_decoder needs a C\+\+ compiler; or set "
        r"speed.compile_decoder=false$",
    ):
        check_decoder_compiler(True, torch.device("cpu"))


def test_a_run_with_a_compiled_decoder_scores_what_an_eager_one_does(
    fresh_dynamo, tiny_preset, tmp_path, monkeypatch, capsys
):
    """The trainer with speed.compile_decoder: its decodes compile once (the line), and
    two epochs' rewards are the eager run's within the roundings of a fused float32
    decoder (the policy's samples are the same: the decode is no log-probability)."""
    from lowvram_ddpo.memory.estimate import settings_of
    from lowvram_ddpo.trainer import Trainer

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    rewards = {}
    for compiled in (False, True):
        config = load_preset(str(tiny_preset))
        apply_overrides(
            config,
            ["run.progress=false", "memory.decode_batch=4", f"speed.compile_decoder={compiled}"],
        )
        assert settings_of(config)["compile_decoder"] is compiled
        before = graphs()
        history = Trainer(config, tmp_path / str(compiled)).fit()
        assert graphs() == before + compiled  # sampling batches of 8 in decodes of 4
        rewards[compiled] = [m["reward_mean"] for m in history]
    log = capsys.readouterr()
    assert log.out.count("speed.compile_decoder=true: the VAE's decoder compiled in ") == 1
    assert rewards[True] == pytest.approx(rewards[False], rel=1e-3)
