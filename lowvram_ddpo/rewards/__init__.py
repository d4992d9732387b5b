"""Rewards: one file each, registered by name. Importing this package registers them all."""

from lowvram_ddpo.rewards import (  # noqa: F401  (registers them)
    aesthetic,
    alignment,
    clip_score,
    hps,
    imagereward,
    jpeg,
    mix,
)
from lowvram_ddpo.rewards.base import (
    ModelReward,
    Reward,
    available_rewards,
    build_reward,
    check_reward_names,
    check_rewards,
    register_reward,
    reward_with_random_weights,
)

__all__ = [
    "ModelReward",
    "Reward",
    "available_rewards",
    "build_reward",
    "check_reward_names",
    "check_rewards",
    "register_reward",
    "reward_with_random_weights",
]
