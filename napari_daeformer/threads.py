"""How many CPU threads a loop of PyTorch steps should use while other processes share the cores.

PyTorch's OpenMP threads wait for each other at the end of every parallel operation, spinning first. When another
process holds a core, one of our threads is descheduled and its partners spin until it runs again, at every one of
the thousands of operations in a training step: on 2 cores with a second PyTorch process running, a fine-tuning
step of the `small` model took 9 s with 2 threads and 0.43 s with 1 (0.21 s with 2 threads on an idle machine).
`ThreadGovernor` times a short probe of parallel work at each candidate thread count every few steps and uses the
fastest, so a loop runs on all cores when they are free and backs off when they are not.
"""

from __future__ import annotations

import time
from types import TracebackType

import torch
import torch.nn.functional as F


class ThreadGovernor:
    """Choose torch's intra-op thread count by probing; restores the previous count on exit.

    Usage::

        with ThreadGovernor() as threads:
            for batch in batches:
                threads.tick()          # re-probes every `every` calls
                step(batch)

    Args:
        max_threads: the most threads to use (default: torch's current setting).
        every: steps between probes.
        reps: repetitions of the probe's work (a LayerNorm and a matmul on a (6272, 64) tensor, about 1 ms each
            on an idle core; a probe costs ~20 ms idle and a few hundred ms on oversubscribed cores).
    """

    def __init__(self, max_threads: int | None = None, every: int = 10, reps: int = 20) -> None:
        top = max_threads or torch.get_num_threads()
        self.candidates = sorted({top, max(1, top // 2), 1}, reverse=True)
        self.every, self.reps = every, reps
        self.threads = top
        self.history: list[int] = []        # the choice made at each probe
        self._calls = 0
        self._saved: int | None = None
        self._work: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> ThreadGovernor:
        self._saved = torch.get_num_threads()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)

    def tick(self) -> int:
        """Call before each step: probes every `every` calls, sets and returns the thread count."""
        if self._calls % self.every == 0 and len(self.candidates) > 1:
            self.threads = min(self.candidates, key=self._probe)
            self.history.append(self.threads)
        self._calls += 1
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def _probe(self, threads: int) -> float:
        """Seconds for `reps` rounds of parallel work with `threads` threads."""
        if self._work is None:
            generator = torch.Generator().manual_seed(0)       # the global random state is not touched
            self._work = (torch.randn(6272, 64, generator=generator), torch.randn(64, 64, generator=generator))
        x, w = self._work
        torch.set_num_threads(threads)
        F.layer_norm(x, (64,))                                 # wake the thread pool at this size
        start = time.perf_counter()
        for _ in range(self.reps):
            F.layer_norm(x, (64,))
            x @ w
        return time.perf_counter() - start
