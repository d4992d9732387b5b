"""Errors the user can fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import sys
from pathlib import Path


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


HTTP_CLIENTS = ("httpx2", "httpx")
"""The HTTP clients huggingface_hub may talk through (its versions differ)."""


def loading_errors() -> tuple[type[BaseException], ...]:
    """What loading a model or a weights file raises that the user can fix: a missing or
    unreadable file, or a hub file not in the cache offline (OSError); a folder without
    what it needs (ValueError); no network where a hub call lets its HTTP client's error
    through instead of turning it into an OSError (diffusers' LoRA loader asks the hub
    which file to take: a ConnectError). Only clients already imported can have raised."""
    http = tuple(sys.modules[name].HTTPError for name in HTTP_CLIENTS if name in sys.modules)
    return (OSError, ValueError, *http)


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name where it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_user_text(path: Path, what: str) -> str:
    """A text file the user wrote (a preset, a run's config, a prompt list), as UTF-8 on
    every system (Windows would take its own code page); one line where it is not UTF-8
    (Notepad's "Unicode" is UTF-16)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: save it as UTF-8") from None
