"""Rewards: one file each, registered by name. Importing this package registers them all."""

from lowvram_ddpo.rewards import jpeg  # noqa: F401  (registers the JPEG rewards)
from lowvram_ddpo.rewards.base import (
    Reward,
    available_rewards,
    build_reward,
    check_rewards,
    register_reward,
)

__all__ = ["Reward", "available_rewards", "build_reward", "check_rewards", "register_reward"]
