"""Files written by renaming into place: a run killed at any moment leaves either the old
file or the new one, never half of one."""

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
    except BaseException:  # disk full, killed...: leave nothing half written behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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
