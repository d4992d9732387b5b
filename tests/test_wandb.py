"""The wandb tracker, run offline: what a user's wandb run would hold.

wandb writes an offline run as a ``.wandb`` transaction log (its protobuf records in a
LevelDB-style log, the format ``wandb sync`` uploads); ``logged_records`` reads it back.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from lowvram_ddpo.config import Config  # noqa: E402
from lowvram_ddpo.reporting.trackers import LOGS_DIR, WandbTracker, build_tracker  # noqa: E402

BLOCK = 32 * 1024
HEADER = 7  # ":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def logged_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` file: chunks of [crc u32, length u16, type u8, data]
    in 32 KiB blocks, a record split across blocks as FIRST, MIDDLE..., LAST."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    records, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        if BLOCK - offset % BLOCK < 7:  # a block's tail too short for a chunk is padding
            offset += BLOCK - offset % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def written_records(path: Path, rows: int, seconds: float = 30.0) -> list:
    """The records of ``path`` once it holds ``rows`` history rows, or whatever it holds
    after ``seconds``: wandb's service process may still be writing the offline log when
    ``finish()`` returns on a loaded machine (seen once in CI, 2026-11-26: no history
    rows read, the same test passing alone)."""
    deadline = time.monotonic() + seconds
    while True:
        records = logged_records(path)
        if len(history(records)) >= rows or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(records: list) -> list[dict[str, object]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    return rows


def run_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / LOGS_DIR).glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def _log_an_epoch(tracker: WandbTracker, epoch: int, reward: float, grid: Path) -> None:
    tracker.log_metrics({"epoch": epoch, "reward_mean": reward, "loss": 0.25}, epoch)
    tracker.log_image("grids/progress", grid, epoch)


def test_an_offline_wandb_run_holds_the_metrics_the_grids_and_the_config(offline, tmp_path):
    run_dir, grid = tmp_path / "run", tmp_path / "grid.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(grid)
    config = Config()
    config.train.learning_rate = 7e-5

    tracker = build_tracker("wandb", run_dir, config, first_epoch=0)
    _log_an_epoch(tracker, 1, 1.5, grid)
    _log_an_epoch(tracker, 2, 2.5, grid)
    tracker.close()

    [log] = run_files(run_dir)
    run_id = (run_dir / LOGS_DIR / "wandb_id").read_text()
    assert log.name == f"run-{run_id}.wandb"
    records = written_records(log, rows=2)
    rows = history(records)
    assert [json.loads(r["_step"]) for r in rows] == [1, 2]
    assert [json.loads(r["reward/mean"]) for r in rows] == [1.5, 2.5]
    assert all(json.loads(r["train/loss"]) == 0.25 for r in rows)
    assert all("epoch" not in r for r in rows)  # the step itself
    assert [json.loads(r["grids/progress/_type"]) for r in rows] == ["image-file"] * 2
    assert {json.loads(r["grids/progress/width"]) for r in rows} == {24}
    media = [log.parent / "files" / json.loads(r["grids/progress/path"]) for r in rows]
    assert all(path.is_file() for path in media)  # the grid itself goes with the run

    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_id and run_record.display_name == "run"
    config_items = {i.key: i.value_json for i in run_record.config.update}
    assert json.loads(config_items["train"])["learning_rate"] == 7e-5


def test_a_resumed_run_continues_the_same_wandb_run(offline, tmp_path):
    run_dir, grid = tmp_path / "run", tmp_path / "grid.png"
    Image.new("RGB", (8, 8)).save(grid)
    first = WandbTracker(run_dir, Config())
    _log_an_epoch(first, 1, 1.0, grid)
    first.close()
    resumed = WandbTracker(run_dir, Config())
    _log_an_epoch(resumed, 2, 2.0, grid)
    resumed.close()

    logs = run_files(run_dir)
    assert len(logs) == 2  # one offline folder per process, as wandb does
    run_id = (run_dir / LOGS_DIR / "wandb_id").read_text()
    assert {log.name for log in logs} == {f"run-{run_id}.wandb"}  # `wandb sync` joins them
    steps = [json.loads(r["_step"]) for log in logs for r in history(written_records(log, 1))]
    assert sorted(steps) == [1, 2]
