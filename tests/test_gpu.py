"""The engine's CUDA path: streams, events and pinned buffers (`transfers.py`). Runs where a CUDA GPU is present
(the project's CI has none: there the same bookkeeping is checked in program order by test_transfers.py and
test_inference.py)."""

from __future__ import annotations

import pytest
import torch

from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.engine.transfers import Transfers
from napari_daeformer.io.sample_data import synthetic_ct
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_transfers_on_cuda_round_trip_and_keep_each_batch_until_the_next_but_one() -> None:
    t = Transfers(torch.device("cuda"))
    up = [t.upload(torch.full((4, 8), k, dtype=torch.int16)) for k in range(3)]
    assert [int(u.float().mean()) for u in up] == [0, 1, 2] and up[0].is_cuda
    a = t.download(torch.full((3, 8), 7, dtype=torch.uint8, device="cuda"))
    b = t.download(torch.full((3, 8), 9, dtype=torch.uint8, device="cuda"))
    assert a.arrays[0].is_pinned()
    assert (a.wait()[0] == 7).all() and (b.wait()[0] == 9).all()


def test_cuda_engine_agrees_with_the_cpu_and_with_itself_across_batch_sizes() -> None:
    ckpt = load_checkpoint(bundled_model("ct"))
    image = synthetic_ct(seed=0).image
    cpu = SliceInferer(ckpt, device="cpu", precision="fp32").segment(image).labels
    fp32 = {b: SliceInferer(ckpt, device="cuda", precision="fp32", batch_size=b).segment(image).labels
            for b in (1, 7, 64)}
    bf16 = SliceInferer(ckpt, device="cuda", precision="bf16", batch_size=7).segment(image).labels
    for labels in fp32.values():
        assert (labels == cpu).mean() >= 0.999               # cuDNN may run the convolutions in TF32
    assert (bf16 == cpu).mean() >= 0.995
