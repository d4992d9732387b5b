"""Learning is visible on the shipped pocket models: DDPO-IS and sparse RWR raise
incompressibility, RLCM on pocket-lcm raises both JPEG rewards, and DiffusionNFT and
Flow-GRPO raise incompressibility on pocket-flow, within a CPU test budget (fixed seeds)."""

from __future__ import annotations

import pytest

from lowvram_ddpo.config import apply_overrides, load_preset, validate
from lowvram_ddpo.models import POCKET_DIR
from lowvram_ddpo.trainer import train

pytestmark = pytest.mark.skipif(
    not (POCKET_DIR / "pocket-sd" / "model_index.json").is_file(), reason="pocket not built"
)


HALF_EPOCH = ["sample.batches_per_epoch=2", "train.gradient_accumulation_steps=2"]
"""32 samples per epoch instead of 64, still one optimiser step: half the time."""


@pytest.mark.parametrize(
    ("preset", "algorithm", "epochs", "extra"),
    [
        # DDPO on pocket-compressibility left out to keep CI under 15 minutes: the
        # compressibility reward's learning is covered by the RLCM run below. DDPO-IS
        # rises with half the samples (measured: 1.177 -> 1.220 over the last 3 epochs);
        # sparse RWR, which trains on its top samples only, needs the preset's 64.
        ("pocket-incompressibility", "ddpo-is", 10, HALF_EPOCH),
        ("pocket-incompressibility", "sparse-rwr", 7, []),  # measured: +0.07 by epoch 7
        ("pocket-rlcm-incompressibility", "ddpo-is", 8, []),  # RLCM: the 4-step LCM policy
        ("pocket-rlcm-compressibility", "ddpo-is", 8, []),
        # DiffusionNFT on the pocket flow model (SD 3's design), CFG-free
        ("pocket-nft-incompressibility", "nft", 6, HALF_EPOCH),
        # Flow-GRPO, CFG-free on a window of 5 SDE steps (measured: 1.140 -> 1.273 over
        # the last 3 of 8 epochs; with guidance 4.5 it did not rise at all)
        ("pocket-flow-grpo-incompressibility", "grpo", 8, HALF_EPOCH),
    ],
)
def test_reward_rises_on_the_pocket_model(preset, algorithm, epochs, extra, tmp_path):
    config = load_preset(preset)
    # a short run at twice the preset's learning rate: measured to rise within this budget
    apply_overrides(
        config,
        [
            f"train.algorithm={algorithm}",
            f"run.epochs={epochs}",
            "train.learning_rate=2e-2",
            "run.grid_every=0",
            "run.progress=false",
            *extra,
        ],
    )
    validate(config)
    history = train(config, tmp_path / "run")
    rewards = [m["reward_mean"] for m in history]
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.03, rewards
