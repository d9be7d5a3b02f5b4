"""The thread governor: its decision rule, its stall trigger, and that it leaves torch as it found it."""

import torch

from napari_daeformer.base.threads import ThreadGovernor, choose_threads


def _probe_from(times: dict[int, list[float]]):
    """A probe that replays the given seconds per thread count, cut at the limit as the real one is."""
    def probe(threads: int, limit: float) -> float:
        return min(times[threads].pop(0), limit + 1e-9)
    return probe


def test_more_threads_must_win_clearly_and_mostly():
    assert choose_threads([2, 1], _probe_from({1: [1.0] * 3, 2: [0.5] * 3})) == 2
    assert choose_threads([2, 1], _probe_from({1: [1.0] * 3, 2: [0.9] * 3})) == 1       # within the margin
    assert choose_threads([2, 1], _probe_from({1: [1.0] * 3, 2: [0.5, 9.0, 9.0]})) == 1  # one lucky probe
    assert choose_threads([4, 2, 1], _probe_from({1: [1.0] * 3, 2: [0.6] * 3, 4: [0.5] * 3})) == 2


class _Clock:
    """A perf_counter that moves only when told (or by `step` per reading): no test here depends on the machine's
    speed or load."""

    def __init__(self, step: float = 0.0) -> None:
        self.now, self.step, self.readings = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.readings += 1
        return self.now


def test_a_stalled_step_triggers_a_new_decision(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("napari_daeformer.base.threads.perf_counter", clock)
    governor = ThreadGovernor(max_threads=2, every=1000)
    decisions = []
    monkeypatch.setattr("napari_daeformer.base.threads.choose_threads", lambda c, p: decisions.append(2) or 2)
    saved = torch.get_num_threads()
    with governor:
        for pause in (0.01, 0.01, 0.01, 0.01, 0.2):     # the last step is 20x the others: another process started
            governor.tick()
            clock.now += pause
        governor.tick()
    assert len(decisions) == 2                         # the first tick, then the stall
    assert torch.get_num_threads() == saved


def test_the_probe_stops_once_it_has_lost(monkeypatch):
    clock = _Clock(step=0.001)                         # each reading: a millisecond of work
    monkeypatch.setattr("napari_daeformer.base.threads.perf_counter", clock)
    governor = ThreadGovernor(max_threads=1, reps=10_000)
    assert 0.01 < governor._probe(1, 0.01) < 0.02
    assert clock.readings < 20                         # stopped at the limit, not after 10,000 rounds


def test_a_probe_leaves_the_thread_count_as_it_found_it():
    """`tick` sets the count chosen; a probe on its own changes nothing (one left at 1 slowed every later step)."""
    before = torch.get_num_threads()
    ThreadGovernor(reps=1)._probe(before + 1, float("inf"))
    assert torch.get_num_threads() == before


def test_nested_entries_each_restore_the_count_they_found():
    """Fine-tuning enters its governor around all runs and each run's trainer enters it again: the inner exit
    restores the count the inner entry found, the outer exit the caller's (a single saved count was overwritten by
    the inner entry, so a fine-tune under contention left the whole process at 1 thread)."""
    caller = torch.get_num_threads()
    governor = ThreadGovernor(max_threads=max(caller, 2))
    try:
        with governor:
            torch.set_num_threads(1)                   # what `tick` chose on busy cores
            with governor:
                torch.set_num_threads(2)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(caller)
