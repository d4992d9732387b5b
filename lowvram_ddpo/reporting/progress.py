"""Durations as people read them, the time a run has left, and word from a long wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 10 min``, ``3 d 4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


class TimeLeft:
    """The run's ETA from the wall time of the epochs this process has finished (sampling,
    training, checkpoints and grids included), so a resumed run estimates from its own.
    From the second epoch on the first is left out: it also warms up (cuDNN's choices,
    ``speed.compile``'s traces and graphs: ~60 s on an H100 for the RLCM preset, about as
    long as one of its graphed epochs there), which would inflate every estimate after it.
    After the first, the only one to go by, a run that ``compiles`` says its estimate is
    high (Inductor's compile: 290 s on an H100 against a ~6 min epoch of the SD 1.5 preset)."""

    def __init__(self, total_epochs: int, first_epoch: int, compiles: bool = False) -> None:
        self.total, self.first = total_epochs, first_epoch
        self.compiles = compiles
        self.started = time.perf_counter()
        self.warmed_up: float | None = None
        """When this process's first epoch ended."""

    def after(self, epochs_done: int) -> str:
        """``~2 h 10 min left`` after ``epochs_done`` epochs (counted from 1), or ""."""
        now = time.perf_counter()
        finished = epochs_done - self.first
        if finished == 1:
            self.warmed_up = now
        left = self.total - epochs_done
        if finished <= 0 or left <= 0:
            return ""
        if finished >= 2 and self.warmed_up is not None:
            per_epoch = (now - self.warmed_up) / (finished - 1)
        else:
            per_epoch = (now - self.started) / finished
        high = " at most: this epoch compiled" if finished == 1 and self.compiles else ""
        return f"~{format_duration(per_epoch * left)} left{high}"


@contextmanager
def word_while_waiting(
    say: Callable[[str], None], line: Callable[[float], str], first: float, every: float
) -> Iterator[None]:
    """While the block runs, ``say(line(seconds so far))`` after ``first`` seconds and then
    every ``every``: a wait of minutes with nothing on the screen (Inductor compiling the
    UNet, ~4 min on an H100, longer on a slower PC) looks like a hung run. Says nothing
    when the block ends sooner. From a daemon thread; the block is not interrupted."""
    done = threading.Event()
    started = time.perf_counter()

    def speak() -> None:
        wait = first
        while not done.wait(wait):
            say(line(time.perf_counter() - started))
            wait = every

    thread = threading.Thread(target=speak, name="word-while-waiting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
