"""Atomic checkpoints: a run killed at any moment resumes from the last complete one.

Layout of a run folder::

    config.toml                         the resolved config (``--resume`` reads it)
    metrics.jsonl                       one JSON object per finished epoch (numbered from 1)
    latest.json                         {"checkpoint": "checkpoints/epoch-0007", "epochs_done": 7}
    pytorch_lora_weights.safetensors    the newest adapter, for pipeline.load_lora_weights(run)
    lora_kohya.safetensors              the same in kohya's layout, for ComfyUI / A1111 / Forge
    checkpoints/epoch-0007/             adapter, optimiser, advantage statistics, RNG states
    grids/                              sample grids

A checkpoint folder is written under a temporary name and renamed into place, and
``latest.json`` is replaced only after that, so a kill leaves either the old or the
new checkpoint, never half of one. Nothing here is unpickled: tensors are read with
``weights_only=True`` or from safetensors, the rest is JSON.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowvram_ddpo.atomic import copy_atomic, flush_entries, flush_to_disk, write_text_atomic
from lowvram_ddpo.divergence import NonFiniteTraining, all_finite
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.lora_export import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    has_kohya_layout,
    save_kohya_lora,
    save_lora_for_diffusers,
    write_kohya_lora,
)
from lowvram_ddpo.models import (
    adapter_state_dict,
    has_lora,
    load_adapter_state_dict,
    trainable_parameters,
)

ADAPTER_FILE = "adapter_model.safetensors"
FULL_UNET_DIR = "unet"
"""Full fine-tuning (``model.lora_rank = 0``) saves the whole UNet as a diffusers folder."""
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest.json"


@dataclass
class TrainerState:
    epochs_done: int
    stat_tracker: dict
    rng: dict[str, torch.Tensor]
    algorithm: dict[str, torch.Tensor] = field(default_factory=dict)
    """An algorithm's own tensors (DiffusionNFT's sampling weights); empty for the rest."""
    optimizer_steps: int = 0
    grad_scaler: dict = field(default_factory=dict)
    """An fp16 run's gradient scaler (its scale and growth count; empty for the rest): a
    resume goes on at the scale it had, not at 2^16 with steps skipped to find it again."""


def rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run_dir: Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs_done: int,
    stat_tracker: dict,
    keep: int = 2,
    algorithm: dict[str, torch.Tensor] | None = None,
    optimizer_steps: int = 0,
    optimizer_kind: str = "",
    grad_scaler: dict | None = None,
) -> Path:
    """Write ``checkpoints/epoch-NNNN`` atomically and point ``latest.json`` at it.
    Weights that are not finite are refused before anything is written or rotated out."""
    if not all_finite(trainable_parameters(unet)):  # the adapter, or every weight
        raise NonFiniteTraining(f"the weights after epoch {epochs_done} are NaN or infinite")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epochs_done:04d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state = {"epochs_done": epochs_done, "stat_tracker": stat_tracker}
        state["optimizer_steps"] = optimizer_steps
        state["optimizer"] = optimizer_kind or optimizer_kind_of(optimizer.state_dict())
        state["grad_scaler"] = grad_scaler or {}
        _write_checkpoint_files(tmp, unet, optimizer, state, algorithm or {})
        flush_to_disk(tmp)  # on the disk before latest.json can name it
    except BaseException:  # disk full, killed...: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    flush_entries(root)
    latest = {"checkpoint": f"checkpoints/{name}", "epochs_done": epochs_done}
    write_text_atomic(run_dir / LATEST_FILE, json.dumps(latest))
    refresh_exports(run_dir, final)
    _prune(root, keep, final)
    return final


RUN_EXPORTS = (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, FULL_UNET_DIR)
"""What a checkpoint also leaves in the run folder itself, for loaders to find."""


def refresh_exports(run_dir: Path, checkpoint: Path, only_stale: bool = False) -> None:
    """Copy the ``checkpoint``'s exports (``RUN_EXPORTS``, those it has) into ``run_dir``:
    after a save, and (``only_stale``: where missing or not the checkpoint's) on a resume,
    where a run killed between ``latest.json`` and the copies left last epoch's."""
    for export in RUN_EXPORTS:
        source, target = checkpoint / export, run_dir / export
        if source.exists() and not (only_stale and _same_export(source, target)):
            copy_atomic(source, target)


def _same_export(source: Path, target: Path) -> bool:
    """Whether ``target`` is already ``source``'s copy: a file byte for byte (a LoRA: a few
    MB), a folder (a fully fine-tuned UNet: GBs) by its copied time stamp."""
    if not target.exists():
        return False
    if source.is_dir():
        return target.stat().st_mtime >= source.stat().st_mtime
    return filecmp.cmp(source, target, shallow=False)


def _write_checkpoint_files(
    tmp: Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    algorithm: dict[str, torch.Tensor],
) -> None:
    tmp.mkdir()
    if has_lora(unet):
        save_file(adapter_state_dict(unet), tmp / ADAPTER_FILE)
        save_lora_for_diffusers(unet, tmp)
        if has_kohya_layout(unet):
            save_kohya_lora(unet, tmp, state["epochs_done"])
    else:
        # one file: diffusers splits at 10 GB (SDXL's UNet in fp32 is 10.3), resume reads one
        unet.save_pretrained(tmp / FULL_UNET_DIR, max_shard_size=UNSHARDED)
    blob = {"optimizer": optimizer.state_dict(), "rng": rng_states(), "algorithm": algorithm}
    torch.save(blob, tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state))


def _prune(root: Path, keep: int, latest: Path) -> None:
    """Keep the ``keep`` newest checkpoints by epoch (a name's digits: "epoch-10000" is
    newer than "epoch-9999") and always ``latest``, the one ``latest.json`` names (a folder
    of a later epoch can be a killed run's leftover, resumed with fewer epochs)."""
    done = kept_checkpoints(root)
    for old in done[: max(0, len(done) - max(keep, 1))]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def kept_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders in ``root`` (a run's ``checkpoints``), oldest epoch first."""
    return sorted((p for p in root.glob("epoch-*") if p.is_dir()), key=_epoch_of)


def _epoch_of(folder: Path) -> int:
    digits = folder.name.removeprefix("epoch-")
    return int(digits) if digits.isdigit() else -1


def _latest(run_dir: Path) -> dict | None:
    """``latest.json``'s record (None before the first checkpoint); one line where it is
    damaged (a copy cut short, an edit), naming what to write into it."""
    pointer = run_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        record = json.loads(pointer.read_text())
    except json.JSONDecodeError:
        record = None
    if isinstance(record, dict) and {"checkpoint", "epochs_done"} <= record.keys():
        return record
    kept = kept_checkpoints(run_dir / "checkpoints")
    hint = (
        f': write {{"checkpoint": "checkpoints/{kept[-1].name}", "epochs_done": '
        f"{_epoch_of(kept[-1])}}} into it (the newest kept)"
        if kept
        else ": no checkpoint is kept; start the run again"
    )
    raise UserError(f"{pointer} is damaged{hint}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    record = _latest(run_dir)
    if record is None:
        return None
    pointer = run_dir / LATEST_FILE
    folder = run_dir / record["checkpoint"]
    if not folder.is_dir():
        raise UserError(
            f"{pointer} points at {folder}, which is missing: the run folder is damaged"
        )
    return folder


def epochs_done(run_dir: Path) -> int:
    """Epochs the run's newest checkpoint holds (0 before the first)."""
    record = _latest(run_dir)
    return record["epochs_done"] if record else 0


def check_epochs_left(run_dir: Path, done: int, epochs: int) -> None:
    """A resumed run must have epochs left to train."""
    if done >= epochs:
        raise UserError(
            f"{run_dir} has already trained {done} of {epochs} epochs: nothing to do. To "
            f"train longer: --resume {run_dir} --epochs N, with N above {done}"
        )


def load_checkpoint(
    folder: Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    optimizer_kind: str = "",
) -> TrainerState:
    """Load adapter and optimiser in place; return the rest of the trainer's state."""
    if (folder / ADAPTER_FILE).is_file():
        load_adapter_state_dict(unet, load_file(folder / ADAPTER_FILE))
    else:
        unet.load_state_dict(full_unet_weights(folder / FULL_UNET_DIR))
    blob = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    state = json.loads((folder / STATE_FILE).read_text())
    check_optimizer_kind(
        folder, state.get("optimizer") or optimizer_kind_of(blob["optimizer"]), optimizer_kind
    )
    optimizer.load_state_dict(blob["optimizer"])
    return TrainerState(
        state["epochs_done"],
        state["stat_tracker"],
        blob["rng"],
        blob.get("algorithm", {}),  # checkpoints before NFT have none
        state.get("optimizer_steps", 0),
        state.get("grad_scaler", {}),
    )


UNSHARDED = "1000GB"
"""``save_pretrained``'s shard size for a fully fine-tuned UNet: never split."""


def full_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved UNet's weights: one safetensors file, or the shards its index names (a
    checkpoint written before they were kept whole)."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index.is_file():
        return load_file(folder / "diffusion_pytorch_model.safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {name: t for shard in shards for name, t in load_file(folder / shard).items()}


def optimizer_kind_of(state: dict) -> str:
    """``memory.optimizer``'s name for the optimiser a state dict came from: torch's AdamW
    keeps ``exp_avg``, bitsandbytes' 8-bit one ``state1`` ("" when it has no state yet)."""
    for param_state in state.get("state", {}).values():
        if "exp_avg" in param_state:
            return "adamw"
        if "state1" in param_state:
            return "adamw8bit"
    return ""


def check_optimizer_kind(folder: Path, saved: str, using: str) -> None:
    """One line where the checkpoint's optimiser state is another optimiser's than the
    resumed run builds (a run begun without bitsandbytes fell back to torch's AdamW)."""
    if not saved or not using or saved == using:
        return
    needs = " (bitsandbytes and a CUDA GPU)" if saved == "adamw8bit" else ""
    raise UserError(
        f"{folder} holds {saved}'s optimiser state, which {using} cannot take: resume with "
        f"--set memory.optimizer={saved}{needs}"
    )


EXPORT_FORMATS = ("kohya", "diffusers")


def checkpoint_to_export(run: Path, epoch: int | None) -> Path:
    """The checkpoint folder ``lowvram-ddpo export`` reads: the run's newest, a kept one
    (``epoch``), or ``run`` itself when it is a checkpoint folder."""
    if (run / STATE_FILE).is_file():
        return run
    if not (run / "config.toml").is_file():
        raise UserError(f"{run} is not a run folder (no config.toml) nor a checkpoint folder")
    if epoch is None:
        folder = latest_checkpoint(run)
        if folder is None:
            raise UserError(f"{run} has no checkpoint yet: train at least one epoch first")
        return folder
    folder = run / "checkpoints" / f"epoch-{epoch:04d}"
    if not folder.is_dir():
        kept = [p.name for p in kept_checkpoints(run / "checkpoints")]
        raise UserError(
            f"no checkpoint of epoch {epoch} in {run} (kept: {', '.join(kept) or 'none'}); "
            "run.keep_checkpoints sets how many are kept"
        )
    return folder


def export_lora(run: Path, fmt: str, output: Path | None, epoch: int | None) -> Path:
    """Write a run's LoRA as one file in ``fmt`` (kohya: ComfyUI/A1111/Forge; diffusers)."""
    from lowvram_ddpo.config import load_config_file

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown --format {fmt!r}: choose {' or '.join(EXPORT_FORMATS)}")
    folder = checkpoint_to_export(run, epoch)
    if not (folder / ADAPTER_FILE).is_file():
        raise UserError(
            f"{folder} holds a fully fine-tuned UNet, not a LoRA: use its folder "
            f"{folder / FULL_UNET_DIR} as the model's unet"
        )
    done = json.loads((folder / STATE_FILE).read_text())["epochs_done"]
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    suffix = "" if fmt == "kohya" else "-diffusers"
    output = output or Path(f"{run_dir.resolve().name}-epoch{done}{suffix}.safetensors")
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output} must end in .safetensors (the loaders look for it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    source = folder / (KOHYA_WEIGHTS_NAME if fmt == "kohya" else LORA_WEIGHTS_NAME)
    if source.is_file():
        copy_atomic(source, output)
    elif fmt == "kohya":  # a checkpoint from before kohya files were written: convert
        model = load_config_file(run_dir / "config.toml").model
        adapter = load_file(folder / ADAPTER_FILE)
        if any(key.startswith("transformer_blocks.") for key in adapter):
            raise UserError(
                "an SD 3.x LoRA has no kohya layout: use --format diffusers (ComfyUI and "
                "diffusers load that file)"
            )
        write_kohya_lora(adapter, model.lora_rank, model.lora_alpha, output, epochs_done=done)
    else:
        raise UserError(f"{source} is missing: the checkpoint folder is damaged")
    return output
