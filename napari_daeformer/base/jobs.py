"""The project's long jobs (segment, batch, fine-tune) are generators: they yield progress and return a result, so a
GUI worker can show each step and cancel between them. `drain` runs one to its end outside a worker."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

P = TypeVar("P")
R = TypeVar("R")


def drain(job: Generator[P, None, R], on_progress: Callable[[P], None] | None = None) -> R:
    """Run `job` to its end, calling `on_progress` with each yielded progress; return the job's result."""
    while True:
        try:
            progress = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)
