"""Python's garbage collector beside a long background job in the viewer.

A full (generation 2) collection walks every object the process holds: napari's, Qt's and torch's, over a million
in a viewer. During a teaching session the trainer's allocations trigger one every 10-20 s, and it stops every
thread, the viewer's included, for 260-350 ms (measured with `gc.callbacks` during `bench_responsiveness.py --teach`:
the longest event-loop gaps of the session, 2 cores, AMD EPYC). `gc.freeze` moves the objects alive now out of the
collector's reach, so later collections walk only what was made since; the docks hold a freeze while any of their
jobs runs. Nothing is collected first (that would be the same pause, at the click): objects frozen and dropped
meanwhile are freed by reference counting as usual, and only garbage cycles among them wait for the thaw.
"""

from __future__ import annotations

import gc

_holders = 0          # jobs that asked for a frozen heap and have not yet thawed it


def freeze() -> None:
    """Keep what is alive now out of later collections until `thaw`."""
    global _holders
    if _holders == 0:
        gc.freeze()
    _holders += 1


def thaw() -> None:
    """The job is over: once no job holds it, the frozen objects are collected as usual again."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders == 0:
        gc.unfreeze()
