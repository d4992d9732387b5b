"""A batch width that halves when the card runs out of memory, instead of ending the run.

The VAE's decode works through a batch of images a few at a time (``memory.decode_batch``),
and one image's decode does not change another's: a narrower call gives the same images,
so a chunk that runs out of memory can simply be tried again narrower, as ComfyUI and
AUTOMATIC1111 retry a failed decode (there, tiled). The estimate is least sure of this
phase (on an H100, 2026-11-27: sampling with a decode of 4 images held 5.59 GiB where
the estimate said 4.50), and an out-of-memory error there would otherwise cost the
whole epoch's sampling. Only for such independent work: a training micro-batch changes
what is summed (and what is compiled), so the fit chooses it and an error there stops
the run with its advice (``Trainer.out_of_memory_message``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowvram_ddpo.memory.allocator import release_cached_blocks


class NarrowingWidth:
    """How many items go into one call: ``width`` until a call runs out of memory, then
    half as many, down to one; at one, ``last_resort`` (when given) may change the work
    once more (the VAE's tiling) and say so, else the error stands. The width stays
    narrowed for later calls (the next batches of the epoch, the next epochs), and each
    change leaves a line in ``notes`` for the run's log."""

    def __init__(self, width: int, setting: str, work: str = "decoding images") -> None:
        if width < 1:
            raise ValueError(f"{setting} must be at least 1, not {width}")
        self.width = width
        self.setting = setting
        self.work = work  # what the calls do, as the notes say it
        self.notes: list[str] = []

    def map(
        self,
        items: Tensor,
        work: Callable[[Tensor], Tensor],
        last_resort: Callable[[], str] | None = None,
    ) -> list[Tensor]:
        """``work`` of each run of at most ``width`` items along the first dimension, in
        order; a run that runs out of memory is tried again narrower."""
        outputs: list[Tensor] = []
        done = 0
        while done < len(items):
            chunk = items[done : done + self.width]
            output = _unless_out_of_memory(work, chunk)
            if output is None:
                self._narrow(len(chunk), last_resort)
                continue
            outputs.append(output)
            done += len(chunk)
        return outputs

    def take_notes(self) -> list[str]:
        """The lines written since the last call (each is said once)."""
        notes, self.notes = self.notes, []
        return notes

    def _narrow(self, failed: int, last_resort: Callable[[], str] | None) -> None:
        release_cached_blocks()  # the failed call's blocks, cut to its shapes
        if failed > 1:
            self.width = failed // 2
            self.notes.append(
                f"out of GPU memory {self.work} {failed} at once: {self.width} at a time from "
                f"now on in this run (--set {self.setting}={self.width} starts there)"
            )
            return
        note = last_resort() if last_resort is not None else ""
        if not note:
            raise torch.OutOfMemoryError(f"out of GPU memory with {self.setting}=1")
        self.notes.append(note)


def _unless_out_of_memory(work: Callable[[Tensor], Tensor], chunk: Tensor) -> Tensor | None:
    """``work(chunk)``, or None when the card ran out of memory. Returning from the
    ``except`` drops the error and with it the failed call's frames and their tensors,
    which a retry inside the handler would still hold."""
    try:
        return work(chunk)
    except torch.OutOfMemoryError:
        return None
