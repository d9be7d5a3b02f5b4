"""A generator job's RuntimeError reaches the user as our own error, whatever its message."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.base.jobs import drain
from napari_daeformer.plugin.widgets._workers import guarded


@pytest.mark.parametrize(("raised", "message"), [(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"),
                                                  "Fine-tuning failed: CUDA out of memory."),
                                                 (RuntimeError(), "Fine-tuning failed: RuntimeError")])
def test_runtime_errors_become_ours_with_one_line(raised: RuntimeError, message: str) -> None:
    def job(n: int) -> Generator[int, None, str]:
        yield n
        raise raised

    with pytest.raises(TrainingError) as info:
        drain(guarded(job, TrainingError, "Fine-tuning")(1))
    assert str(info.value) == message and info.value.__cause__ is raised
