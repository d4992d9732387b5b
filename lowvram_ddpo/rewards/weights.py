"""Reward weight files: found locally or in the hub cache, read without running pickled
code, and loaded into transformers classes without a random init first.

Official reward checkpoints (LAION's aesthetic head, HPS v2, ImageReward) are single
``.pt``/``.pth`` files, not transformers folders. A setting names one either as a local
path or as ``"org/repo/path/in/repo"``, which ``hf_hub_download`` serves from its cache
when offline; anything else it cannot find is a one-line ``UserError`` saying what to
download and which setting to point at it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowvram_ddpo.errors import UserError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_weights_file(location: str) -> bool:
    """True for a single weights file (local, or "org/repo/file.pt" in the hub); False for a
    transformers folder or hub model id."""
    return Path(location).expanduser().is_file() or location.endswith(WEIGHT_SUFFIXES)


def _download_hint(hub_file: str) -> str:
    org, repo, file = hub_file.split("/", 2)
    return f"`hf download {org}/{repo} {file}`"


def weights_file(location: str, what: str, setting: str, hub_file: str) -> Path:
    """The local path of ``location``: a file, or "org/repo/path" from the hub (its cache
    when offline). ``hub_file`` is the official file, named in the error messages."""
    path = Path(location).expanduser()
    if path.is_file():
        return path
    parts = location.split("/")
    if len(parts) < 3 or location.startswith((".", "/", "~")):
        raise UserError(
            f"{what} '{location}' not found: download {hub_file} ({_download_hint(hub_file)}) "
            f'and set {setting} to the local file (or to a hub file as "org/repo/file")'
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as err:  # noqa: BLE001  (any hub failure gets the same advice)
        raise UserError(
            f"could not get {what} '{location}' ({type(err).__name__}); offline, download it "
            f"first ({_download_hint(location)}) and set {setting} to the local file"
        ) from None


def load_state_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A .safetensors file, or a torch.save file read with weights_only=True (tensors and
    plain containers only); ``mmap``: the tensors stay in the file until used, so a 2 GB
    checkpoint is not read into memory twice."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )  # mmap needs torch's zip format; older files are read whole
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} holds more than tensors; it is not unpickled (weights_only): convert it "
            "to a plain state dict or .safetensors"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def from_state_dict(
    model_class: Any, config: Any, state: dict[str, Tensor], dtype: torch.dtype, what: str,
    **kwargs: Any,
) -> Any:  # fmt: skip
    """``model_class(config)`` holding ``state`` (converted names), in ``dtype``, frozen.
    transformers builds it on the meta device and assigns the tensors (no random init, no
    second copy); any missing, unexpected or misshapen weight is refused, since a model
    that is partly random would still score, silently wrong."""
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True,
        ignore_mismatched_sizes=True, **kwargs,
    )  # fmt: skip
    misshapen = sorted(info["mismatched_keys"])
    problems = [
        *(f"{key} missing" for key in sorted(info["missing_keys"])),
        *(f"{key} unexpected" for key in sorted(info["unexpected_keys"])),
        *(f"{key} is {tuple(got)}, not {tuple(want)}" for key, got, want in misshapen),
    ]
    if problems:
        raise UserError(
            f"{what} does not fit the model ({len(problems)} problems, first: {problems[0]})"
        )
    return model.requires_grad_(False).eval()
