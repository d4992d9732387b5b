"""Checkpoints a killed, full or resumed run can rely on: what is kept, what loads back,
and one line where a resume cannot go on (a review found each case, 2026-11-27)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny import build_tiny_pipeline

from lowvram_ddpo.atomic import copy_atomic
from lowvram_ddpo.checkpoint import (
    FULL_UNET_DIR,
    full_unet_weights,
    latest_checkpoint,
    load_checkpoint,
    optimizer_kind_of,
    refresh_exports,
    save_checkpoint,
)
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import make_trainable, trainable_parameters
from lowvram_ddpo.reporting.metrics_chart import read_metrics
from lowvram_ddpo.trainer import _truncate_metrics


def _lora_unet() -> torch.nn.Module:
    unet = build_tiny_pipeline().unet
    make_trainable(unet, 2, 2.0, [])
    return unet


def _adamw_with_state(unet: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(trainable_parameters(unet), lr=1e-3)
    sum(p.sum() for p in trainable_parameters(unet)).backward()
    optimizer.step()
    return optimizer


def test_pruning_keeps_the_newest_epochs_by_number_and_always_the_latest(tmp_path):
    """ "epoch-10000" is newer than "epoch-9999" (the names sort the other way), and the
    checkpoint latest.json names is never pruned, even beside a later epoch's folder that
    a killed run left (then resumed with fewer epochs)."""
    unet = _lora_unet()
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    save_checkpoint(tmp_path, unet, optimizer, 9999, {}, keep=1)
    newest = save_checkpoint(tmp_path, unet, optimizer, 10000, {}, keep=1)
    assert latest_checkpoint(tmp_path) == newest and newest.is_dir()
    assert [p.name for p in (tmp_path / "checkpoints").glob("epoch-*")] == ["epoch-10000"]

    other = tmp_path / "other"
    leftover = other / "checkpoints" / "epoch-0005"
    leftover.mkdir(parents=True)  # renamed into place, then killed before latest.json
    kept = save_checkpoint(other, unet, optimizer, 3, {}, keep=1)
    assert latest_checkpoint(other) == kept and kept.is_dir()


def test_a_folder_copy_goes_on_past_a_killed_copys_leftover(tmp_path):
    """A copy killed while it deleted the old folder leaves ``.dst.old`` half deleted;
    the next copy of that folder must not fail on it (every later export would)."""
    src, dst = tmp_path / "src", tmp_path / "unet"
    src.mkdir()
    (src / "weights").write_text("new")
    dst.mkdir()
    (dst / "weights").write_text("old")
    leftover = tmp_path / ".unet.old"
    leftover.mkdir()
    (leftover / "half-deleted").write_text("x")
    copy_atomic(src, dst)
    assert (dst / "weights").read_text() == "new" and not leftover.exists()


def test_a_resume_with_another_optimisers_state_is_one_line(tmp_path):
    """A run begun without bitsandbytes stepped with torch's AdamW: resumed where 8-bit
    AdamW would build, the state cannot load (bitsandbytes' keys differ, and a torch AdamW
    given its state fails at the first step): one line naming the setting that resumes.
    The kind is read from the state itself for checkpoints written before it was saved."""
    unet = _lora_unet()
    optimizer = _adamw_with_state(unet)
    folder = save_checkpoint(tmp_path, unet, optimizer, 1, {}, optimizer_kind="adamw")
    assert json.loads((folder / "trainer_state.json").read_text())["optimizer"] == "adamw"
    with pytest.raises(UserError, match="resume with --set memory.optimizer=adamw$"):
        load_checkpoint(folder, unet, optimizer, "adamw8bit")
    state = load_checkpoint(folder, unet, optimizer, "adamw")
    assert state.epochs_done == 1
    assert optimizer_kind_of(optimizer.state_dict()) == "adamw"
    assert optimizer_kind_of({"state": {0: {"state1": 0, "qmap1": 0}}}) == "adamw8bit"
    assert optimizer_kind_of({"state": {}}) == ""


def test_a_fully_fine_tuned_unet_is_saved_whole_and_shards_still_load(tmp_path):
    """diffusers splits a UNet above 10 GB (SDXL's in fp32 is 10.3): a checkpoint keeps it
    in one file, and one written in shards (before) loads from its index."""
    unet = build_tiny_pipeline().unet
    unet.requires_grad_(True)
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    folder = save_checkpoint(tmp_path, unet, optimizer, 1, {})
    assert (folder / FULL_UNET_DIR / "diffusion_pytorch_model.safetensors").is_file()
    sharded = tmp_path / "sharded"
    unet.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    weights = full_unet_weights(sharded)
    assert weights.keys() == unet.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())


def test_a_metrics_line_cut_short_by_a_full_disk_does_not_stop_the_resume(tmp_path):
    """A disk that filled while an epoch's line was appended leaves half a JSON line: the
    resume drops it (that epoch was not checkpointed) and the chart reads past it."""
    path = Path(tmp_path / "metrics.jsonl")
    good = [json.dumps({"epoch": e, "reward_mean": 0.1 * e}) for e in (1, 2)]
    path.write_text("\n".join(good) + '\n{"epoch": 3, "rew')
    assert [m["epoch"] for m in read_metrics(path)] == [1, 2]
    _truncate_metrics(path, 1)
    assert path.read_text() == good[0] + "\n"


def test_a_resume_refreshes_the_run_folders_lora_a_kill_left_a_epoch_behind(tmp_path):
    """The run folder's LoRA files are copied after latest.json moves on: a run killed in
    between left last epoch's there, and its resume (even one refused: nothing to do)
    copies them again; files already current are left alone."""
    unet = _lora_unet()
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    save_checkpoint(tmp_path, unet, optimizer, 1, {})
    stale = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    with torch.no_grad():
        for p in trainable_parameters(unet):
            p.add_(1.0)
    newest = save_checkpoint(tmp_path, unet, optimizer, 2, {})
    fresh = (newest / "pytorch_lora_weights.safetensors").read_bytes()
    assert fresh != stale
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(stale)  # the kill's leftover
    refresh_exports(tmp_path, newest, only_stale=True)
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == fresh
    os.utime(tmp_path / "pytorch_lora_weights.safetensors", (0, 0))
    refresh_exports(tmp_path, newest, only_stale=True)  # current: left as it is
    assert (tmp_path / "pytorch_lora_weights.safetensors").stat().st_mtime == 0


def test_a_damaged_latest_json_is_one_line_naming_the_newest_kept(tmp_path):
    """latest.json cut short (a copy, an edit) was a JSONDecodeError at resume and export."""
    unet = _lora_unet()
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    save_checkpoint(tmp_path, unet, optimizer, 7, {})
    (tmp_path / "latest.json").write_text('{"checkpoint": "checkp')
    expected = '"checkpoint": "checkpoints/epoch-0007", "epochs_done": 7'
    with pytest.raises(UserError, match=expected):
        latest_checkpoint(tmp_path)


def test_an_fp16_runs_gradient_scale_comes_back_with_its_checkpoint(tmp_path):
    """A resumed fp16 run goes on at the scale it had found, not at 2^16 (skipping steps
    until overflows bring it down again)."""
    unet = _lora_unet()
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    found = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    found.load_state_dict({**found.state_dict(), "scale": 512.0, "_growth_tracker": 37})
    folder = save_checkpoint(tmp_path, unet, optimizer, 1, {}, grad_scaler=found.state_dict())
    state = load_checkpoint(folder, unet, optimizer)
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    resumed.load_state_dict(state.grad_scaler)
    assert resumed.get_scale() == 512.0 and resumed.state_dict()["_growth_tracker"] == 37
    bf16 = save_checkpoint(tmp_path, unet, optimizer, 2, {})  # no scaler: nothing to restore
    assert load_checkpoint(bf16, unet, optimizer).grad_scaler == {}


def test_a_checkpoint_is_on_the_disk_before_latest_json_names_it(tmp_path, monkeypatch):
    """A power cut must not leave latest.json naming a folder whose files the system had
    not written yet: every file of the checkpoint is flushed (fsync) before the pointer
    moves, and the pointer itself before its rename."""
    import lowvram_ddpo.atomic as atomic
    import lowvram_ddpo.checkpoint as checkpoint

    events: list[str] = []
    real_open = os.open
    names: dict[int, str] = {}

    def open_and_name(path, flags, *args):  # noqa: ANN001, ANN002, ANN202
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    monkeypatch.setattr(atomic.os, "open", open_and_name)
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(f"flush {names[fd]}"))
    real_write = checkpoint.write_text_atomic
    monkeypatch.setattr(
        checkpoint,
        "write_text_atomic",
        lambda path, text: (events.append(f"point {path.name}"), real_write(path, text)),
    )
    unet = _lora_unet()
    optimizer = torch.optim.SGD(trainable_parameters(unet), lr=0.1)
    folder = save_checkpoint(tmp_path, unet, optimizer, 1, {})
    pointing = events.index("point latest.json")
    flushed = {e.removeprefix("flush ") for e in events[:pointing] if e.startswith("flush")}
    assert {p.name for p in folder.iterdir()} <= flushed
    assert "flush .latest.json.tmp" in events[pointing:]
