"""The collector's freeze during a background job: what was alive is out of full collections until the last job
thaws it; a job that never froze cannot thaw another's."""

from __future__ import annotations

import gc

from napari_daeformer.base import collector


def test_freeze_holds_until_the_last_job_thaws() -> None:
    assert gc.get_freeze_count() == 0
    kept = [object() for _ in range(1000)]
    collector.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)                   # what was alive is frozen
        collector.freeze()                           # a second job: nothing more to do
        collector.thaw()
        assert gc.get_freeze_count() == frozen       # still held by the first
    finally:
        collector.thaw()
    assert gc.get_freeze_count() == 0
    collector.thaw()                                 # one thaw too many: nothing happens
    assert gc.get_freeze_count() == 0
