"""Byte sizes as people write them ("8GB", "7.5 GiB", "6144MB") and back."""

from __future__ import annotations

import re

from torch import nn

from lowvram_ddpo.errors import UserError

GB = 1024**3
_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": GB, "kib": 1024, "mib": 1024**2}
_UNITS["gib"] = GB
# A card sold as "8 GB" has 8 GiB; both spellings mean the binary unit here.


def means_as_written(vram: str) -> bool:
    """Whether a ``--vram`` value asks for no fit: empty, or "off"."""
    return vram.strip().lower() in ("", "off")


def means_this_card(vram: str) -> bool:
    """Whether a ``--vram`` value is "auto": the machine's own card, not a size."""
    return vram.strip().lower() == "auto"


def parse_size(text: str) -> int:
    """'8GB' -> bytes (GB and GiB both mean 1024^3, as card makers use them). A number
    without a unit is refused: "8" meant as gigabytes would be read as 8 bytes, and the
    fit would say that nothing fits (bytes are written "8B")."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match and not unit:
        raise UserError(f"'{text}' has no unit: write {match.group(1)}GB (or MB)")
    if not match or unit not in _UNITS or (unit == "b" and "." in match.group(1)):
        raise UserError(f"cannot read '{text}' as a memory size: write it like 8GB or 6144MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: float) -> str:
    return f"{size / GB:.2f} GB"


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers where they are stored."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))
