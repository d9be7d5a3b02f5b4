"""Corrections survive a killed napari: a viewer process painted in is SIGKILLed, a new viewer restores its work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.io.sample_data import synthetic_ct
from napari_daeformer.plugin.widgets._layers import annotation_of, corrected_slices
from napari_daeformer.session.annotation import (
    ENV_FOLDER,
    Annotation,
    ImageIdentity,
    find_sessions,
    image_key,
    load_session,
    save_session,
    session_path,
)

pytestmark = pytest.mark.gui

PAINTED = (2, 5, 8)
SHAPE = (12, 96, 96)

PAINTER = """
import sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
from napari_daeformer.session.annotation import load_session
from napari_daeformer.io.sample_data import synthetic_ct

viewer = napari.Viewer(show=False)
sample = synthetic_ct(seed=3, shape=%(shape)r)
viewer.add_image(sample.image, name="CT", scale=sample.spacing)
_, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
app = QApplication.instance()

def wait(condition, seconds=120):
    end = time.time() + seconds
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.time() > end:
            sys.exit("timed out")

widget._run.clicked()
wait(lambda: not widget.running and "CT DAE-Former" in viewer.layers)
layer = viewer.layers["CT DAE-Former"]
layer.n_edit_dimensions = 2
layer.brush_size = 9
for z in %(painted)r:                                  # three strokes, one per slice, as a user paints
    viewer.dims.set_current_step(0, z)
    layer.paint((z, 48, 20 + 3 * z), 4)
saver = next(iter(widget.autosavers.values()))
wait(lambda: saver.path.exists() and load_session(saver.path).annotation.touched.get(0) == set(%(painted)r)
     and not saver.timer.isActive() and saver.pending.done())
np.save(sys.argv[1], np.asarray(layer.data))
print("SAVED", flush=True)
time.sleep(600)
"""


def test_killed_viewer_loses_no_correction(make_napari_viewer, qtbot, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path / "autosave"))
    expected = tmp_path / "painted.npy"
    child = subprocess.Popen([sys.executable, "-c", PAINTER % {"shape": SHAPE, "painted": PAINTED}, str(expected)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    saved = False
    try:
        for line in child.stdout:                          # type: ignore[union-attr]  # napari's notices come first
            if line.strip() == "SAVED":
                saved = True
                break
    finally:
        child.send_signal(signal.SIGKILL)                  # napari killed: no chance to save anything more
        child.wait(timeout=30)
    assert saved, child.stderr.read()[-3000:]              # type: ignore[union-attr]
    assert child.returncode == -signal.SIGKILL
    painted = np.load(expected)

    viewer = make_napari_viewer()
    sample = synthetic_ct(seed=3, shape=SHAPE)
    viewer.add_image(sample.image, name="CT", scale=sample.spacing)       # the same image, opened again
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    assert "3 corrected slices" in widget._restore_info.value, widget._restore_info.value
    assert not widget._restore.native.isHidden()                         # the offer: Restore (and Discard)
    widget._run.clicked()                                                 # Run before Restore: a new layer ...
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    fresh = viewer.layers["CT DAE-Former"]
    qtbot.waitUntil(lambda: widget.autosavers[fresh.unique_id].pending.done(), timeout=20_000)
    assert len(find_sessions([tmp_path / "autosave"], image_key(sample.image))) == 2   # ... with a file of its own
    assert "3 corrected slices" in widget._restore_info.value, widget._restore_info.value   # the offer stands
    widget._restore.clicked()
    layer = viewer.layers[-1]
    assert layer is not fresh
    assert np.array_equal(layer.data, painted)                            # every stroke is back
    assert np.flatnonzero(corrected_slices(viewer, layer)).tolist() == list(PAINTED)   # and which were corrected
    assert layer.metadata["checkpoint"] == "ct_small.safetensors"
    assert not np.array_equal(annotation_of(viewer, layer).prediction, painted)
    assert widget._restore.native.isHidden()                             # nothing left to restore

    other = make_napari_viewer()                                          # dock first, then the image opened
    _, docked = other.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    other.add_image(np.zeros((4, 32, 32), np.int16), name="another scan")
    other.add_image(sample.image, name="CT again", scale=sample.spacing)
    assert docked._image.value.name == "CT again" and "corrected slices" in docked._restore_info.value

    layer.data_setitem((np.array([10]), np.array([5]), np.array([5])), 3)   # painting goes on being saved
    saver = widget.autosavers[layer.unique_id]
    qtbot.waitUntil(lambda: not saver.timer.isActive() and saver.pending is not None and saver.pending.done()
                    and 10 in load_session(saver.path).annotation.touched[0], timeout=20_000)


def test_session_file_round_trip_and_damage(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1, 2:4, 2:4] = 3
    labels[3, 0, :] = 1
    key = image_key(np.arange(24).reshape(2, 3, 4))
    assert key == image_key(np.arange(24).reshape(2, 3, 4)) != image_key(np.arange(24).reshape(3, 2, 4))
    annotation = Annotation(image=ImageIdentity(key, "ct"), layer_name="ct DAE-Former", class_names=("bg", "a", "b", "c"),
                            prediction=np.zeros_like(labels), checkpoint="m.safetensors", touched={0: {1}, 2: {5}})
    path = save_session(session_path(tmp_path, annotation), annotation, labels)
    second = Annotation(image=ImageIdentity(key, "ct"), layer_name="ct DAE-Former")                  # another layer on the image
    assert session_path(tmp_path, second) != path
    assert find_sessions([tmp_path / "missing", tmp_path], key) == [path]
    with pytest.MonkeyPatch.context() as m:                               # the same file, planted by another user
        m.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)
        assert find_sessions([tmp_path], key) == []
    back = load_session(path)
    a = back.annotation
    assert np.array_equal(back.labels, labels) and a.id == annotation.id and a.touched == {0: {1}, 2: {5}}
    assert a.corrected(back.labels).tolist() == [0, 1, 0, 1]                # changed or painted, along axis 0
    assert a.corrected(back.labels, 2).tolist() == [1, 1, 1, 1, 1, 1, 1, 1]  # row 0 of slice 3 spans every column
    assert a.corrected(back.labels, 1).tolist() == [1, 0, 1, 1, 0, 0, 0, 0]
    path.write_bytes(path.read_bytes()[:100])                             # a torn file: one clear error
    with pytest.raises(Exception, match="not a readable autosaved session"):
        load_session(path)


def test_damaged_session_is_named_and_can_be_discarded(make_napari_viewer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path))
    image = np.arange(4 * 32 * 32, dtype=np.int16).reshape(4, 32, 32)
    torn = session_path(tmp_path, Annotation(image=ImageIdentity(image_key(image), "scan"), layer_name="scan"))
    torn.write_bytes(b"PK\x03\x04 half a file")                          # a save cut short by something worse
    viewer = make_napari_viewer()
    viewer.add_image(image, name="scan")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    assert "cannot be read" in widget._restore_info.value
    assert widget._restore.native.isHidden() and not widget._discard.native.isHidden()
    widget._discard.clicked()
    assert not torn.exists() and widget._discard.native.isHidden()


def test_a_session_bomb_or_damaged_session_is_refused_quickly(make_napari_viewer, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A small file that would decompress to far more than the image's labels, or whose members are of the wrong
    kind, is named in the dock without being decompressed; the dock opens and offers Discard."""
    import time
    import zipfile

    monkeypatch.setenv(ENV_FOLDER, str(tmp_path))
    image = np.arange(4 * 32 * 32, dtype=np.int16).reshape(4, 32, 32)
    annotation = Annotation(image=ImageIdentity(image_key(image), "scan"), layer_name="scan")
    bomb = session_path(tmp_path, annotation)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("labels.npy", b"\0" * (64 << 20))                  # 64 MiB of zeros: a few KiB compressed
        z.writestr("meta.npy", b"\0")
    assert bomb.stat().st_size < 1 << 20
    viewer = make_napari_viewer()
    t0 = time.perf_counter()
    viewer.add_image(image, name="scan")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    assert time.perf_counter() - t0 < 10
    assert "more than labels of this image need" in widget._restore_info.value
    assert widget._restore.native.isHidden() and not widget._discard.native.isHidden()
