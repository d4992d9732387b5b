"""A batch width that halves when the card runs out of memory, instead of ending the run.

The VAE's decode works through a batch of images a few at a time (``memory.decode_batch``),
and one image's decode does not change another's: a narrower call gives the same images,
so a chunk that runs out of memory can simply be tried again narrower, as ComfyUI and
AUTOMATIC1111 retry a failed decode (there, tiled). The estimate is least sure of this
phase (on an H100, 2026-11-27: sampling with a decode of 4 images held 5.59 GiB where
the estimate said 4.50), and an out-of-memory error there would otherwise cost the
whole epoch's sampling. A reward model's scoring batch (``reward.batch_size``) narrows
the same way: its images are scored one by one. Only for such independent work: a
training micro-batch changes what is summed (and what is compiled), so the fit chooses
it and an error there stops the run with its advice (``Trainer.out_of_memory_message``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from lowvram_ddpo.memory.allocator import release_cached_blocks


class NarrowingWidth:
    """How many items go into one call: ``width`` until a call runs out of memory, then
    half as many (rounded up), down to one; a call of one item that runs out of memory gets
    ``last_resort`` (when given), once in the width's life: it may change the work (the
    VAE's tiling) and say so, else the error stands. The width stays narrowed for later
    calls (the next batches of the epoch, the next epochs), and each change leaves a line
    in ``notes`` for the run's log."""

    def __init__(self, width: int, setting: str, doing: str = "decoding images") -> None:
        if width < 1:
            raise ValueError(f"{setting} must be at least 1, not {width}")
        self.width = width
        self.setting = setting
        self.doing = doing  # what the calls do, as the notes say it
        self.notes: list[str] = []
        self.resort_taken = False

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
            output, error = _unless_out_of_memory(work, chunk)
            if output is None:
                self._narrow(len(chunk), last_resort, error)
                continue
            outputs.append(output)
            done += len(chunk)
        return outputs

    def take_notes(self) -> list[str]:
        """The lines written since the last call (each is said once)."""
        notes, self.notes = self.notes, []
        return notes

    def _narrow(self, failed: int, last_resort: Callable[[], str] | None, error: str) -> None:
        release_cached_blocks()  # the failed call's blocks, cut to its shapes
        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if on_cuda and threading.current_thread() is threading.main_thread():
            # the failed call's near-full card is not a peak the run needs from now on
            # (not from a reward's worker thread: the main thread's phase is being measured)
            torch.cuda.reset_peak_memory_stats()
        if failed > 1:
            self.width = (failed + 1) // 2  # 3 -> 2: no narrower than half
            self.notes.append(
                f"out of GPU memory {self.doing} {failed} at once: {self.width} at a time from "
                f"now on in this run (--set {self.setting}={self.width} starts there)"
            )
            return
        self.width = 1  # a last chunk of one failed: one at a time from now on
        note = "" if self.resort_taken or last_resort is None else last_resort()
        if not note:
            raise torch.OutOfMemoryError(f"{error} (already at {self.setting}=1)")
        self.resort_taken = True
        self.notes.append(note)


def _unless_out_of_memory(
    work: Callable[[Tensor], Tensor], chunk: Tensor
) -> tuple[Tensor | None, str]:
    """``work(chunk)``, or None and CUDA's message when the card ran out of memory.
    Returning from the ``except`` drops the error and with it the failed call's frames
    and their tensors, which a retry inside the handler would still hold."""
    try:
        return work(chunk), ""
    except torch.OutOfMemoryError as error:
        return None, str(error)
