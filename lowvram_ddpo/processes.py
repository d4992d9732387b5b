"""How many processes a run has: torchrun and `accelerate launch` set ``WORLD_SIZE``."""

from __future__ import annotations

import os


def world_size() -> int:
    """The run's processes (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
