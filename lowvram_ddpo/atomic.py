"""Files written by renaming into place: a run killed at any moment leaves either the old
file or the new one, never half of one. What is renamed is flushed to the disk first
(``flush_to_disk``), so a power cut after the rename cannot leave the new name on
blocks the system had not written yet."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomic_with(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        flush_to_disk(tmp)
    except BaseException:  # disk full, killed...: leave nothing half written behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    flush_entries(path.parent)  # the rename itself


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic_with(path, lambda tmp: tmp.write_text(text))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or a folder into place by renaming, so ``dst`` is never half written."""
    if not src.is_dir():
        write_atomic_with(dst, lambda tmp: shutil.copyfile(src, tmp))
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # a killed copy's leftover would block the rename
    if dst.exists():
        os.replace(dst, old)  # a folder cannot be replaced in one step: keep it until done
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def flush_to_disk(path: Path) -> None:
    """Have the system write ``path`` (a file, or a folder and everything in it) to the
    disk before going on."""
    if path.is_dir():
        for child in path.iterdir():
            flush_to_disk(child)
        flush_entries(path)
        return
    _fsync(path, os.O_RDWR)  # Windows commits only what it may write


def flush_entries(folder: Path) -> None:
    """Have the system write ``folder``'s list of names (a rename into it) to the disk,
    where it can: a folder cannot be opened for that on Windows."""
    if os.name != "nt":
        _fsync(folder, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
