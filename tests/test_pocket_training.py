"""Learning is visible on the shipped pocket model: DDPO-IS raises both JPEG rewards and
sparse RWR raises incompressibility, within a CPU test budget (fixed seeds)."""

from __future__ import annotations

import pytest

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.models import POCKET_DIR
from lowvram_ddpo.trainer import train

pytestmark = pytest.mark.skipif(
    not (POCKET_DIR / "pocket-sd" / "model_index.json").is_file(), reason="pocket not built"
)


@pytest.mark.parametrize(
    ("preset", "algorithm"),
    [
        ("pocket-incompressibility", "ddpo-is"),
        ("pocket-compressibility", "ddpo-is"),
        ("pocket-incompressibility", "sparse-rwr"),
    ],
)
def test_reward_rises_on_the_pocket_model(preset, algorithm, tmp_path):
    config = load_preset(preset)
    # a short run at twice the preset's learning rate: measured to rise within 10 epochs
    apply_overrides(
        config,
        [
            f"train.algorithm={algorithm}",
            "run.epochs=10",
            "train.learning_rate=2e-2",
            "run.grid_every=0",
            "run.progress=false",
        ],
    )
    validate(config)
    history = train(config, tmp_path / "run")
    rewards = [m["reward_mean"] for m in history]
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.03, rewards
