"""Checks made before a run spends time: that its folder can be written, and that its
settings suit the model (size, vocabulary). Failures are one-line ``UserError``s; a
mismatch that still runs is a one-line note."""

from __future__ import annotations

import re
from pathlib import Path

from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import MODEL_ALIASES


def check_output_folder(run_dir: Path) -> None:
    """Fail before any model is loaded if the run folder cannot be created or written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"cannot write to the run folder {run_dir} ({reason}): choose another with --output"
        ) from None


def native_resolution_of(pipe) -> int:  # noqa: ANN001  (a diffusers pipeline)
    """The size the model was trained at. FLUX.2's transformer has no sample size: its
    pipeline's default (128 latent rows of 8 px: 1024) stands for it."""
    rows = pipe.unet.config.get("sample_size") or pipe.default_sample_size
    return rows * pipe.vae_scale_factor


def resolution_note(pipe, resolution: int, model_name: str) -> str | None:  # noqa: ANN001
    """A warning when the run samples at another size than the model was trained at:
    images come out poor, and larger sizes cost quadratically more time."""
    native = native_resolution_of(pipe)
    if resolution == native:
        return None
    return (
        f"warning: sampling at {resolution} px, but {model_name} was trained at {native} px: "
        f"expect poor images{' and slow epochs' if resolution > native else ''}; "
        f"--resolution {native} matches it"
    )


def unknown_words_note(pipe, prompts: list[str], model_name: str) -> str | None:  # noqa: ANN001
    """The shipped pocket models know only their world's words (shapes, colours, sizes);
    any other word is spelled out letter by letter and means nothing to them."""
    if model_name not in MODEL_ALIASES:
        return None
    vocab = pipe.tokenizer.get_vocab()
    words = {w for p in prompts for w in re.findall(r"[a-z]+", p.lower())}
    unknown = sorted(w for w in words if f"{w}</w>" not in vocab)
    if not unknown:
        return None
    return (
        f"warning: {len(unknown)} prompt word(s) are unknown to the {model_name} model "
        f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}): it knows only the "
        "pocket world's shapes, colours and sizes; use --set prompts.source=pocket_world"
    )
