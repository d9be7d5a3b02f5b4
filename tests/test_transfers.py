"""Host <-> device copies: each batch's buffers survive until the next-but-one batch (checked in program order on
the CPU; on CUDA the same bookkeeping adds streams, events and pinned memory)."""

from __future__ import annotations

import numpy as np
import torch

from napari_daeformer.engine.transfers import Transfers

CPU = torch.device("cpu")


def _labels(value: int, rows: int) -> torch.Tensor:
    return torch.full((rows, 5), value, dtype=torch.uint8)


def test_a_batch_survives_the_next_download_and_buffers_are_reused() -> None:
    t = Transfers(CPU)
    a = t.download(torch.tensor([True]), _labels(1, 3))
    b = t.download(torch.tensor([False]), _labels(2, 4))
    (a_ok, a_labels), (b_ok, b_labels) = a.wait(), b.wait()
    assert a_ok[0] and not b_ok[0]
    assert a_labels.shape == (3, 5) and (a_labels == 1).all()       # not overwritten by the batch queued after it
    assert b_labels.shape == (4, 5) and (b_labels == 2).all()
    c = t.download(torch.tensor([True]), _labels(3, 2))             # a's buffers again (a is collected by now)
    assert np.shares_memory(c.wait()[1], a_labels)
    assert (c.wait()[1] == 3).all() and (b.wait()[1] == 2).all()
    d = t.download(torch.tensor([True]), _labels(4, 6))             # larger than b's buffer: a new one
    assert d.wait()[1].shape == (6, 5) and (d.wait()[1] == 4).all() and (c.wait()[1] == 3).all()


def test_an_upload_is_a_copy_that_survives_the_next_one() -> None:
    t = Transfers(CPU)
    source = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    first = t.upload(source)
    source += 100                                                   # the caller's array may change afterwards
    second = t.upload(source)
    assert torch.equal(first, torch.arange(12, dtype=torch.int16).reshape(3, 4))
    assert torch.equal(second, source) and first.data_ptr() != second.data_ptr()


def test_buffers_made_in_inference_mode_are_writable_outside_it() -> None:
    t = Transfers(CPU)
    with torch.inference_mode():
        t.upload(torch.zeros(2, 3))
        t.upload(torch.zeros(2, 3))
    assert torch.equal(t.upload(torch.ones(2, 3)), torch.ones(2, 3))     # the first buffer again, outside the mode
