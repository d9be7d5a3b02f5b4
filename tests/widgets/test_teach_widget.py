"""Teaching while painting in a real viewer (Plugins menu first): paint 3 slices, start, move to an unpainted slice
and a proposal appears there (in its own layer); Shift+A accepts it; a slice corrected later is trained on in the
next round; Stop saves the model and the Segment dock segments with it; nothing painted is ever overwritten. The
event loop's gaps during the session are printed (their bound is a benchmark's, `bench_responsiveness.py`)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer

from napari_daeformer.io.sample_data import synthetic_chest
from napari_daeformer.plugin.hub import hub_for
from napari_daeformer.session.annotation import ENV_FOLDER, image_key, load_session

from .conftest import from_plugins_menu


def _paint(layer: Any, z: int, mask: np.ndarray, value: int = 1) -> None:
    index = np.nonzero(mask)
    layer.data_setitem((np.full(index[0].shape, z), *index), value)


def _go(viewer: Any, layer: Any, z: int) -> None:
    viewer.dims.set_point(0, float(layer.data_to_world([z, 0, 0])[0]))


class Gaps:
    """The event loop's gaps: a 10 ms timer's lateness."""

    def __init__(self) -> None:
        self.timer, self.gaps, self.last = QTimer(), [], time.perf_counter()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    def tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self.last)
        self.last = now


def _chest(make_napari_viewer, tmp_path: Path, monkeypatch) -> tuple[Any, Any, Any, np.ndarray]:  # type: ignore[no-untyped-def]
    """A viewer with the chest phantom and an empty labels layer; models and autosaves go to `tmp_path`. The
    phantom, the viewer, the labels layer and the lung mask."""
    monkeypatch.setattr("napari_daeformer.plugin.control.finetune.USER_MODELS", tmp_path)
    monkeypatch.setattr("napari_daeformer.plugin.control.teach.USER_MODELS", tmp_path)
    monkeypatch.setenv(ENV_FOLDER, str(tmp_path / "autosave"))
    s = synthetic_chest(0, shape=(12, 96, 96))
    viewer = make_napari_viewer()
    viewer.add_image(s.image, name="chest", scale=s.spacing)
    layer = viewer.add_labels(np.zeros(s.image.shape, np.uint8), name="lungs", scale=s.spacing)
    return s, viewer, layer, np.isin(s.labels, (1, 2))


def test_teach_while_painting_end_to_end(make_napari_viewer, qtbot, tmp_path: Path, monkeypatch, errors) -> None:  # type: ignore[no-untyped-def]
    s, viewer, layer, lungs = _chest(make_napari_viewer, tmp_path, monkeypatch)
    teach = from_plugins_menu("teach_widget")
    teach._run.clicked()                                            # nothing painted yet: said, nothing starts
    assert errors and "paint a structure on at least one slice" in errors[-1] and not teach.running
    for z in (2, 5, 9):
        _paint(layer, z, lungs[z])
    painted = np.asarray(layer.data).copy()
    teach._labels.value = layer
    teach._classes.value = "background, lung"
    gaps = Gaps()
    teach._run.clicked()
    assert teach.running                                            # the model is built off the GUI thread
    qtbot.waitUntil(lambda: teach.proposal_layer is not None, timeout=60_000)
    proposal = teach.proposal_layer
    qtbot.waitUntil(lambda: teach.control.teaching.version >= 1, timeout=120_000)
    _go(viewer, layer, 7)                                           # an unpainted slice
    qtbot.waitUntil(lambda: teach.shown.get(7, 0) >= 1, timeout=30_000)
    assert np.asarray(proposal.data)[7].any()
    assert teach.latencies and max(teach.latencies) < 10.0
    dice = 2 * (np.asarray(proposal.data)[7].astype(bool) & lungs[7]).sum() / (
        np.asarray(proposal.data)[7].astype(bool).sum() + lungs[7].sum())
    assert dice > 0.5, dice                                         # learnt from 3 slices, in one round or a few
    offered = np.asarray(proposal.data)[7].copy()
    layer.keymap[[k for k in layer.keymap if "A" in str(k) and "Shift" in str(k)][0]](layer)   # Shift+A
    assert (np.asarray(layer.data)[7] == offered).all()
    assert teach._done()[7] and 7 not in teach.shown               # accepted: painted, its proposal taken away
    layer.undo()                                                    # one Ctrl+Z takes the accepted slice back
    assert not np.asarray(layer.data)[7].any()
    layer.redo()
    version = teach.control.teaching.version
    _paint(layer, 10, lungs[10])                                    # a correction painted while it trains
    qtbot.waitUntil(lambda: teach.control.teaching.painted[10], timeout=5_000)
    qtbot.waitUntil(lambda: teach.control.teaching.version > version + 1, timeout=120_000)
    assert teach.control.teaching.trained_on[[2, 5, 7, 9, 10]].all()
    _go(viewer, layer, 4)
    qtbot.waitUntil(lambda: teach.shown.get(4, 0) > version, timeout=30_000)
    assert teach.control.choice.record[0][0] == 0                  # slice 7 left as accepted: the model needed no change
    assert gc.get_freeze_count() > 0                                # full collections skip the viewer's objects
    teach._cancel.clicked()                                         # Stop: kept, saved, handed to the Segment dock
    qtbot.waitUntil(lambda: not teach.running, timeout=30_000)
    assert gc.get_freeze_count() == 0                               # ... until the session ends
    gaps.timer.stop()
    assert teach.control.saved and teach.control.saved[0].is_file()
    dock = hub_for(viewer).segment_dock()
    assert dock is not None and Path(dock.checkpoint_path()) == teach.control.saved[0]
    data = np.asarray(layer.data)
    for z in (2, 5, 9, 10):                                         # nothing painted was overwritten
        assert (data[z] == (painted[z] if z != 10 else lungs[10])).all()
    assert not np.asarray(proposal.data)[[2, 5, 7, 9, 10]].any()    # no proposal shown over a painted slice
    saved = load_session(teach.saver.save_now().result(), data.size)     # autosaved as it was painted
    assert (saved.labels == data).all() and saved.annotation.image.key == image_key(s.image)
    assert saved.annotation.corrected(saved.labels)[[2, 5, 7, 9, 10]].all()
    g = np.array(gaps.gaps[1:])
    print(f"event-loop gaps during teaching: p95 {1000 * np.percentile(g, 95):.0f} ms, max {1000 * g.max():.0f} ms "
          f"over {g.sum():.0f} s; proposal latencies {', '.join(f'{x:.2f}' for x in teach.latencies)} s")
    assert g.max() < 5.0                                            # the viewer never froze


def test_teaching_refuses_a_photo(make_napari_viewer, errors) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True)
    teach = from_plugins_menu("teach_widget")
    teach._run.clicked()
    assert errors[-1] == "DAE-Former: choose a volume (a 3D image layer) to teach on" and not teach.running


def test_unnamed_classes_are_asked_for_in_words(make_napari_viewer, qtbot, errors) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((6, 32, 32), np.float32), name="scan")
    layer = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="painted")
    _paint(layer, 2, np.pad(np.ones((8, 8), bool), 12), 3)        # label 3 painted
    teach = from_plugins_menu("teach_widget")
    teach._labels.value = layer
    teach._classes.value = "background, liver"
    teach._run.clicked()
    qtbot.waitUntil(lambda: not teach.running, timeout=30_000)
    assert errors[-1] == "DAE-Former: name every class, background first: the labels hold values up to 3"
    assert teach.control.teaching is None and teach.proposal_layer is None


def test_teaching_follows_the_axis_painted(make_napari_viewer, qtbot, tmp_path: Path, monkeypatch, errors) -> None:  # type: ignore[no-untyped-def]
    """Painted on coronal slices (axis 1), the session teaches on coronal slices: an axial slice crossing a painted
    coronal one is not taken for a painted slice (it would teach "background" everywhere off the painted line);
    proposals and Shift+A work on the coronal slice on screen."""
    _, viewer, layer, lungs = _chest(make_napari_viewer, tmp_path, monkeypatch)
    viewer.dims.order = (1, 0, 2)                                   # coronal slices on screen
    teach = from_plugins_menu("teach_widget")
    for y in (30, 48, 66):
        index = np.nonzero(lungs[:, y, :])
        layer.data_setitem((index[0], np.full(index[0].shape, y), index[1]), 1)
    teach._labels.value = layer
    teach._classes.value = "background, lung"
    teach._run.clicked()
    qtbot.waitUntil(lambda: teach.control.teaching is not None and teach.control.teaching.version >= 2,
                    timeout=120_000)
    assert teach.axis == 1 and np.flatnonzero(teach.control.teaching.painted).tolist() == [30, 48, 66]
    viewer.dims.set_point(1, float(layer.data_to_world([0, 40, 0])[1]))
    qtbot.waitUntil(lambda: teach.shown.get(40, 0) >= 2, timeout=30_000)
    offered = np.asarray(teach.proposal_layer.data)[:, 40, :].copy()
    assert offered.any() and not np.asarray(teach.proposal_layer.data)[:, 30, :].any()
    layer.keymap[[k for k in layer.keymap if "A" in str(k) and "Shift" in str(k)][0]](layer)   # Shift+A
    assert (np.asarray(layer.data)[:, 40, :] == offered).all() and teach._done()[40]
    assert (np.asarray(layer.data)[:, 30, :] == lungs[:, 30, :]).all()   # painted: untouched
    teach._cancel.clicked()
    qtbot.waitUntil(lambda: not teach.running, timeout=30_000)
    assert teach.control.saved and teach.control.saved[0].is_file()
