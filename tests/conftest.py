"""Shared fixtures: everything offline, on the CPU, with tiny models built here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one thread per worker,
    os.environ["OMP_NUM_THREADS"] = "1"  # its subprocesses too (same sums, same numbers)
    import torch

    torch.set_num_threads(1)

from tiny import build_tiny_pipeline, train_tiny_denoiser  # noqa: E402

TINY_PRESET = """
extends = "incompressibility"
description = "tiny test run"

[model]
name = "{model}"
mixed_precision = "no"

[sample]
resolution = 32
num_steps = 4
batch_size = 8
batches_per_epoch = 2

[train]
batch_size = 8
gradient_accumulation_steps = 2
learning_rate = 3e-2

[stats]
buffer_size = 16
min_count = 4

[prompts]
prompts = ["a cat", "a dog"]

[speed]
compile = "off"  # seconds on a CPU, like the pocket presets (incompressibility compiles)

[run]
epochs = 2
grid_every = 0
grid_prompts = ["a cat"]
grid_seeds = [0, 1]
progress = false
"""


LONGEST_FILES_FIRST = (
    "test_pocket_training.py",  # ~4 min: six learning runs of the pocket models
    "test_memory.py",
    "test_speed.py",
    "test_cli.py",
    "test_training.py",
    "test_sdxl.py",
)
"""Under `-n 2 --dist loadfile` a file runs whole on one worker, the files in collection
order (see `pytest_configure`): the longest ones start first, so that no worker ends the
suite alone on one of them."""


def pytest_configure(config: pytest.Config) -> None:
    # xdist would order the files by their number of tests (`--loadscope-reorder`, its
    # default): the pocket learning runs, six tests, then start last and one worker ends
    # alone on them for minutes
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    # a stable sort: each file's tests stay together and in their order
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, its UNet briefly trained (so samples have structure), saved once."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    train_tiny_denoiser(build_tiny_pipeline()).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_pipeline():
    return build_tiny_pipeline()


@pytest.fixture
def tiny_preset(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A preset file for a 2-epoch run of the tiny pipeline; tests add `--set` overrides."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_PRESET.format(model=tiny_model_dir))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with dynamo's caches empty, and the AOT
    settings compile_unet sets (where torch has them) as they were."""
    import torch  # here: the module imports torch only after setting its thread count
    import torch._functorch.config as functorch_config

    names = (
        "force_non_lazy_backward_lowering",
        "graphsafe_rng_functionalization",
        "autograd_cache_allow_custom_autograd_functions",
    )
    kept = {n: getattr(functorch_config, n) for n in names if hasattr(functorch_config, n)}
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    for name, value in kept.items():
        setattr(functorch_config, name, value)
