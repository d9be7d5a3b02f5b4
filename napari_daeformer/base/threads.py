"""How many CPU threads a loop of PyTorch steps should use while other processes share the cores.

PyTorch's OpenMP threads wait for each other at the end of every parallel operation, spinning first. When another
process holds a core, one of our threads is descheduled and its partners spin until it runs again, at every one of
the thousands of operations in a training step: on 2 cores with a second PyTorch process running, a fine-tuning
step of the `small` model took 9 s with 2 threads and 0.43 s with 1 (0.21 s with 2 threads on an idle machine).
`ThreadGovernor` times a short probe of parallel work at each candidate thread count every few steps and uses the
fastest, so a loop runs on all cores when they are free and backs off when they are not.

The two mistakes cost very differently (too many threads on busy cores: 10-20x slower; too few on idle cores:
at most the parallel speed-up, about 1.6x on 2 cores), so more threads must win clearly (`margin`) in most of
`rounds` probes, a probe with more threads stops as soon as it has lost, and a step with more than one thread that
takes `stall` times the typical step time (another process has just started) triggers a new decision at once.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Callable
from time import perf_counter
from types import TracebackType

import torch
import torch.nn.functional as F

#: seconds for one probe at `threads` threads, giving up (returning at least `limit`) once `limit` is passed
Probe = Callable[[int, float], float]


def choose_threads(candidates: list[int], probe: Probe, rounds: int = 3, margin: float = 0.8) -> int:
    """The thread count that wins most of `rounds` probes; ties go to fewer threads.

    In a round, candidates are probed from fewest threads up; one with more threads wins only if it takes less than
    `margin` times the best time so far (and its probe is cut off there).
    """
    wins: Counter[int] = Counter()
    for _ in range(rounds):
        ordered = sorted(candidates)
        best, best_time = ordered[0], probe(ordered[0], float("inf"))
        for n in ordered[1:]:
            t = probe(n, margin * best_time)
            if t < margin * best_time:
                best, best_time = n, t
        wins[best] += 1
    return max(sorted(wins), key=lambda n: wins[n])         # max keeps the first (fewest threads) of equal counts


class ThreadGovernor:
    """Choose torch's intra-op thread count by probing; restores the previous count on exit (of each nested entry:
    fine-tuning enters it around all its runs, each run's trainer again).

    Usage::

        with ThreadGovernor() as threads:
            for batch in batches:
                threads.tick()          # re-probes every `every` calls
                step(batch)

    Args:
        max_threads: the most threads to use (default: torch's current setting).
        every: steps between probes.
        stall: a step this many times slower than the typical step re-probes at once (scoring or logging between
            steps adds well under this).
        reps: repetitions of the probe's work (a LayerNorm and a matmul on a (6272, 64) tensor, about 1 ms each
            on an idle core; a decision, 3 rounds, costs ~80 ms idle and about as much on busy cores, since a
            losing probe is cut off).
    """

    def __init__(self, max_threads: int | None = None, every: int = 10, reps: int = 20, stall: float = 3.0) -> None:
        top = max_threads or torch.get_num_threads()
        self.candidates = sorted({top, max(1, top // 2), 1}, reverse=True)
        self.every, self.reps, self.stall = every, reps, stall
        self.threads = top
        self.history: list[int] = []        # the choice made at each probe
        self._calls = 0
        self._last: float | None = None     # when the previous step started
        self._steps: dict[int, deque[float]] = {}   # recent step times (s) per thread count
        self._saved: list[int] = []         # the count at each (nested) entry
        self._work: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> ThreadGovernor:
        self._saved.append(torch.get_num_threads())
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        torch.set_num_threads(self._saved.pop())

    def tick(self) -> int:
        """Call before each step: probes every `every` calls or after a stalled step, sets and returns the thread
        count."""
        if self._last is not None:
            self._steps.setdefault(self.threads, deque(maxlen=20)).append(perf_counter() - self._last)
        if (self._calls % self.every == 0 or self._stalled()) and len(self.candidates) > 1:
            self.threads = choose_threads(self.candidates, self._probe)
            self.history.append(self.threads)
        self._calls += 1
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self._last = perf_counter()
        return self.threads

    def _stalled(self) -> bool:
        """Whether the last step, run with more than the fewest threads, took `stall` times the typical step."""
        typical = [statistics.median(t) for t in self._steps.values() if len(t) >= 3]
        if self.threads == self.candidates[-1] or not typical:
            return False
        return self._steps[self.threads][-1] > self.stall * min(typical)

    def _probe(self, threads: int, limit: float) -> float:
        """Seconds for `reps` rounds of parallel work with `threads` threads, stopping once past `limit`."""
        if self._work is None:
            generator = torch.Generator().manual_seed(0)       # the global random state is not touched
            self._work = (torch.randn(6272, 64, generator=generator), torch.randn(64, 64, generator=generator))
        x, w = self._work
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            F.layer_norm(x, (64,))                             # wake the thread pool at this size
            start = perf_counter()
            for _ in range(self.reps):
                F.layer_norm(x, (64,))
                x @ w
                if (elapsed := perf_counter() - start) > limit:
                    return elapsed
            return perf_counter() - start
        finally:
            torch.set_num_threads(saved)                       # `tick` sets the count chosen
