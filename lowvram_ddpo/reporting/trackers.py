"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, wandb, or nowhere.

``run.log_with = "auto"`` (the default) logs to TensorBoard when its package is installed,
else nowhere, with a one-line hint. Event files go under ``RUN/logs/``; every epoch's
metrics are logged at step = its epoch number, grouped (reward/, eval/, train/, time/,
memory/), and each progress grid as an image.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path
from typing import Protocol

from PIL import Image

from lowvram_ddpo.config import LOG_WITH, Config, to_dict
from lowvram_ddpo.errors import UserError

LOGS_DIR = "logs"
GROUPS = {
    "reward_": "reward/",
    "eval_": "eval/",
    "seconds_": "time/",
    "phase_seconds_": "time/device_",  # the phase meter's, between device synchronisations
    "peak_": "memory/",
    "start_": "memory/start_",  # what each phase started on: beside its peak, not over it
    "cuda_graph_": "cuda_graphs/",
}
NOT_LOGGED = {"epoch"}
"""The step itself."""


def metric_tag(name: str) -> str:
    """``reward_mean`` -> ``reward/mean``, ``seconds_sampling`` -> ``time/sampling``, and
    everything else (loss, approx_kl, clipfrac, grad_norm...) under ``train/``."""
    for prefix, group in GROUPS.items():
        if name.startswith(prefix):
            return group + name[len(prefix) :]
    return "train/" + name


def loggable(metrics: dict) -> dict[str, float]:
    """The numeric metrics, tagged; non-finite values stay (a tracker shows the gap)."""
    numbers = {k: v for k, v in metrics.items() if type(v) in (int, float)}  # not bools
    return {metric_tag(k): float(v) for k, v in numbers.items() if k not in NOT_LOGGED}


class Tracker(Protocol):
    def log_metrics(self, metrics: dict, epoch: int) -> None: ...
    def log_image(self, tag: str, path: Path, epoch: int) -> None: ...
    def close(self) -> None: ...


class NoTracker:
    def log_metrics(self, metrics: dict, epoch: int) -> None:
        pass

    def log_image(self, tag: str, path: Path, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """``tensorboard --logdir RUN/logs``. A resumed run purges the events after its
    checkpoint (they belong to epochs that are trained again)."""

    def __init__(self, run_dir: Path, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / LOGS_DIR), purge_step=first_epoch)

    def log_metrics(self, metrics: dict, epoch: int) -> None:
        for tag, value in loggable(metrics).items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # a user watching live sees each epoch as it ends

    def log_image(self, tag: str, path: Path, epoch: int) -> None:
        import numpy as np

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases (``pip install wandb``; ``wandb login`` or WANDB_MODE=offline).
    The run's id is kept in ``RUN/logs/wandb_id`` so ``--resume`` continues the same run."""

    def __init__(self, run_dir: Path, config: Config) -> None:
        import wandb

        logs = run_dir / LOGS_DIR
        logs.mkdir(parents=True, exist_ok=True)
        id_file = logs / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(
            project="lowvram-ddpo",
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(logs),
            config=json.loads(json.dumps(to_dict(config), default=str)),  # paths as text
        )

    def log_metrics(self, metrics: dict, epoch: int) -> None:
        self.run.log(loggable(metrics), step=epoch)

    def log_image(self, tag: str, path: Path, epoch: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=epoch)

    def close(self) -> None:
        self.run.finish()


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_log_with(choice: str) -> tuple[str, str]:
    """(the tracker to use, a note for the user or ""); a tracker asked for by name whose
    package is missing is a one-line error before anything loads."""
    if choice not in LOG_WITH:
        raise UserError(f"unknown --log-with {choice!r}: use one of {', '.join(LOG_WITH)}")
    if choice == "auto":
        if installed("tensorboard"):
            return "tensorboard", ""
        return "none", (
            "note: no TensorBoard installed, so metrics go to metrics.jsonl and metrics.png "
            "only (pip install tensorboard, then: tensorboard --logdir <run>/logs)"
        )
    if choice in ("tensorboard", "wandb") and not installed(choice):
        raise UserError(f"--log-with {choice} needs its package: pip install {choice}")
    return choice, ""


def build_tracker(choice: str, run_dir: Path, config: Config, first_epoch: int) -> Tracker:
    if choice == "tensorboard":
        return TensorBoardTracker(run_dir, first_epoch)
    if choice == "wandb":
        return WandbTracker(run_dir, config)
    return NoTracker()
