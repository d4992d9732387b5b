"""Non-finite values never reach a checkpoint.

A learning rate far too high turns the loss, the gradients and then the weights into NaN
or infinity, and every image after that is black. Like a mixed-precision gradient scaler,
the trainer skips an optimiser step whose gradients are not finite and counts it; after
``max_skipped`` such steps in a row, or as soon as the trained weights themselves stop
being finite (nothing can undo that), it stops the run. Checkpoints are checked again
before they are written, so a non-finite one is never written or rotated in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


class NonFiniteTraining(Exception):
    """Training produced NaN or infinite values; the message says where."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every element of every tensor finite (one device sync, not one per tensor)."""
    checks = [t.detach().isfinite().all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


@dataclass
class DivergenceGuard:
    max_skipped: int
    """Skipped steps in a row after which the run stops."""
    skipped_in_a_row: int = 0
    skipped: int = 0
    """Steps skipped since ``take_skipped_count`` was last called."""

    def allows_step(self, grad_norm: float) -> bool:
        """True when the gradients are finite; otherwise the step is to be skipped, and is
        counted. Raises ``NonFiniteTraining`` once ``max_skipped`` were skipped in a row."""
        if math.isfinite(grad_norm):
            self.skipped_in_a_row = 0
            return True
        self.skipped_in_a_row += 1
        self.skipped += 1
        if self.skipped_in_a_row >= self.max_skipped:
            raise NonFiniteTraining(
                f"{self.skipped_in_a_row} optimiser steps in a row had NaN or infinite "
                "gradients and were skipped"
            )
        return False

    def check_weights(self, params: Iterable[torch.Tensor]) -> None:
        if not all_finite(params):
            raise NonFiniteTraining("the trained weights became NaN or infinite")

    def take_skipped_count(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped
