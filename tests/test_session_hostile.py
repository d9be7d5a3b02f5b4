"""Autosaved sessions crafted to crash the Segment dock: a .npy header claiming 9 TiB, a JSON description nested
ten thousand deep, labels of float, bool or one axis, a link to another of the user's sessions. Each is refused in
one DaeformerError line (the dock then offers nothing, or says it cannot be read) and never allocated or followed."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.plugin.control.segment import Offer, SegmentController
from napari_daeformer.session.annotation import (
    SUFFIX,
    Annotation,
    ImageIdentity,
    find_sessions,
    load_session,
    save_session,
    session_path,
)

IMAGE = ImageIdentity("f" * 64, "ct")
META = {"format": 2, "saved_at": 0.0, "id": "a" * 32, "layer_name": "x",
        "image": {"key": IMAGE.key, "name": "ct", "source_path": ""}, "touched": {"0": [1]}}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _session(path: Path, labels: bytes, meta: bytes | None = None) -> Path:
    meta = json.dumps(META).encode() if meta is None else meta
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta.npy", _npy(np.frombuffer(meta, np.uint8)))
        z.writestr("labels.npy", labels)
    return path


def _claiming(shape: tuple[int, ...]) -> bytes:
    """A .npy of uint8 whose header claims `shape` and which holds 16 bytes."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16


@pytest.mark.parametrize(("labels", "meta", "message"), [
    (_claiming((1 << 14, 1 << 14, 1 << 15)), None, "claim (16384, 16384, 32768) voxels, more than the file holds"),
    (_npy(np.zeros((2, 4, 4), np.uint8)), b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    (_npy(np.zeros((2, 4, 4), np.float32)), None, "its labels are float32 of 3 axes, not a label map"),
    (_npy(np.zeros((2, 4, 4), bool)), None, "its labels are bool of 3 axes, not a label map"),
    (_npy(np.zeros(4, np.uint8)), None, "its labels are uint8 of 1 axes, not a label map"),
])
def test_a_crafted_session_is_one_line(tmp_path: Path, labels: bytes, meta: bytes | None, message: str) -> None:
    path = _session(tmp_path / f".ct-{'f' * 16}-x{SUFFIX}", labels, meta)
    with pytest.raises(DaeformerError, match="ct-f+-x.daeformer-session.npz: ") as e:
        load_session(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    offer = SegmentController.offer([path], "ct", 32)
    assert offer is not None and not offer.readable and message in offer.text


def test_labels_must_have_the_images_shape_to_be_restored(tmp_path: Path) -> None:
    annotation = Annotation(image=IMAGE, layer_name="x", touched={0: {1}})
    path = save_session(session_path(tmp_path, annotation), annotation, np.ones(2, np.uint8).reshape(1, 2))
    offer = Offer(path, "", True)
    with pytest.raises(DaeformerError, match=r"its labels \(1, 2\) do not fit the image \(1, 2, 5\)"):
        SegmentController.restore(offer, (1, 2, 5), 10)
    assert SegmentController.restore(offer, (1, 2), 2).labels.shape == (1, 2)
    assert SegmentController.restore(offer, (1, 2, 3), 6).labels.shape == (1, 2)        # an RGB photo's (Y, X)


def test_a_link_to_another_session_is_never_offered(tmp_path: Path) -> None:
    other = Annotation(image=ImageIdentity("e" * 64, "other"), layer_name="x", touched={0: {1}})
    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    target = save_session(session_path(elsewhere, other), other, np.ones((2, 4, 4), np.uint8))
    link = tmp_path / f".ct-{IMAGE.key[:16]}-planted{SUFFIX}"
    os.symlink(target, link)
    assert find_sessions([tmp_path], IMAGE.key) == []
    with pytest.raises(DaeformerError, match="is a link"):
        load_session(link)
