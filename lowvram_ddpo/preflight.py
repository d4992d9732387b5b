"""Checks made before a run spends time: that its folder can be written, and that its
settings suit the model (size, vocabulary). Failures are one-line ``UserError``s; a
mismatch that still runs is a one-line note."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lowvram_ddpo.config import CLIPPED_RATIO, FLOW_ALGORITHMS, Config
from lowvram_ddpo.errors import UserError
from lowvram_ddpo.models import MODEL_ALIASES, resolve_model_name


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


FLOW_PIPELINES = ("StableDiffusion3Pipeline", "Flux2KleinPipeline")
"""The flow-matching pipelines this trainer runs (``models.pipeline_class``)."""
UNET_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline",
)


def saved_model_index(name: str, revision: str = "") -> dict | None:
    """A model's ``model_index.json`` from a local folder or the hub cache, read without
    loading the model (SD 3.5's load takes minutes); None when that file is not at hand
    (nothing is downloaded) or unreadable (the loader says what is wrong with it)."""
    return saved_model_json(name, "model_index.json", revision)


def saved_model_json(name: str, file: str, revision: str = "") -> dict | None:
    """One JSON ``file`` of a model (``model_index.json``, ``unet/config.json``), as
    ``saved_model_index`` reads its index."""
    try:
        folder = Path(resolve_model_name(name)).expanduser()
    except UserError:
        return None
    path = folder / file
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:  # a malformed name is the loader's to explain
            cached = try_to_load_from_cache(name, file, revision=revision or None)
        except ValueError:
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def is_flow_index(index: dict) -> bool | None:
    """Whether a ``model_index.json`` names a flow-matching pipeline (SD 3.x, FLUX.2);
    None for a pipeline this trainer does not know (the loader explains it)."""
    kind = index.get("_class_name", "")
    if kind in FLOW_PIPELINES:
        return True
    return False if kind in UNET_PIPELINES else None


def check_algorithm_fits(config: Config, flow: bool) -> None:
    """The algorithm and sampler settings suit the model: flow-matching models train with
    policy gradients or NFT (RWR's loss is DDPM's), DDPM models not with NFT or windows."""
    s, algorithm = config.sample, config.train.algorithm
    if flow and algorithm not in FLOW_ALGORITHMS:
        raise UserError(
            f"train.algorithm={algorithm} is not available for flow-matching "
            f"models (SD 3.x, FLUX.2) yet: use {', '.join(FLOW_ALGORITHMS)}"
        )
    if s.sde_window and (not flow or algorithm == "nft"):
        raise UserError(
            "sample.sde_window (Flow-GRPO-Fast) is for ddpo-is, ddpo-sf or grpo on "
            "flow-matching models (SD 3, FLUX.2): set it to 0"
        )
    if algorithm == "nft" and not flow:
        raise UserError(
            "train.algorithm=nft trains flow-matching models (SD 3.x, FLUX.2, pocket-flow): "
            "use ddpo-is, grpo or rwr for this model"
        )


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


def rescores_at_other_shapes(config: Config) -> bool:
    """Whether training clips ratios of samples it re-scores at another batch size than
    they were sampled at: with other GPU kernels, so the ratios start off 1 by rounding
    (measured on an H100, 2026-11-26, eager: 0.71 of the clip range sampling 8 and
    training 1 at a time; at equal batches 0.0, as with ``speed.compile=cudagraphs``;
    Inductor's modes, rounding as eager does, replayed exactly on the CPU in bf16 and by
    7.0e-6 rms, 0.07 of the clip range, on an H100 in fp16 at equal batches of 8). A run
    measures its own (``epoch_metrics``: ``replay_rms``)."""
    s, t = config.sample, config.train
    return t.algorithm in CLIPPED_RATIO and t.batch_size != s.batch_size


def replay_note(config: Config, device_type: str, mixed_precision: str) -> str | None:
    """A note when training re-scores the samples with other GPU kernels than sampled
    them, in half precision (``rescores_at_other_shapes``)."""
    s, t = config.sample, config.train
    if not rescores_at_other_shapes(config):
        return None
    if device_type != "cuda" or mixed_precision == "no":
        return None  # full precision: differences far below the clip range
    return (
        f"note: train.batch_size {t.batch_size} differs from sample.batch_size {s.batch_size}: "
        "training re-scores the samples with other GPU kernels, so the ratios start off 1 by "
        "rounding (on an H100, sampled 8 and trained 1 at a time: 0.71 of the clip range, 1 "
        "image in 8 clipped). Equal batches replay exactly; --vram prefers them where they "
        "cost little"
    )
