"""The Segment widget in a real viewer: through the Plugins menu, live slices, cancel, bad input, undo."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.io.sample_data import synthetic_ct, synthetic_skin
from napari_daeformer.plugin.widgets._layers import annotation_of
from napari_daeformer.plugin.widgets.segment import MODES, SegmentWidget

pytestmark = pytest.mark.gui


@pytest.fixture
def ct_viewer(make_napari_viewer) -> tuple[Any, SegmentWidget]:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    sample = synthetic_ct(seed=3, shape=(16, 160, 160))
    viewer.add_image(sample.image, name="CT", scale=sample.spacing, translate=(10.0, -5.0, 2.5))
    viewer.add_labels(sample.labels, name="truth")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    widget._image.value = viewer.layers["CT"]
    return viewer, widget


def _run(widget: SegmentWidget, qtbot) -> None:  # type: ignore[no-untyped-def]
    widget._run.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)


def test_segment_from_plugins_menu(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    assert "synthetic" in widget._status.value                        # says it is a demonstration model
    _run(widget, qtbot)
    layer = viewer.layers["CT DAE-Former"]
    assert layer.data.dtype == np.uint8 and layer.data.shape == (16, 160, 160)
    assert tuple(layer.scale) == tuple(viewer.layers["CT"].scale)
    assert tuple(layer.translate) == (10.0, -5.0, 2.5)
    assert list(layer.features["class"]) == ["background", "liver", "spleen", "left kidney", "right kidney", "aorta"]
    dice = dice_per_class(np.asarray(layer.data), viewer.layers["truth"].data, 6)
    assert np.nanmean(dice) > 0.8, dice
    assert "mL" in widget._status.value
    assert np.array_equal(annotation_of(viewer, layer).prediction, layer.data)
    layer.undo()                                                        # one Ctrl+Z undoes the whole run
    assert not np.asarray(layer.data).any()
    widget._next.clicked()                                             # jump to the most uncertain slice
    assert viewer.dims.current_step[0] == int(np.argmax(widget.last_result.segmentation.slice_uncertainty))


def test_second_run_never_overwrites_an_edited_layer(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    _run(widget, qtbot)
    first = viewer.layers["CT DAE-Former"]
    first.data[5] = 2                                                   # the user's correction
    _run(widget, qtbot)
    assert len([layer for layer in viewer.layers if "DAE-Former" in layer.name]) == 2
    assert (first.data[5] == 2).all()


def test_only_uncorrected_slices_mode(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    _run(widget, qtbot)
    layer = viewer.layers["CT DAE-Former"]
    original = np.array(layer.data, copy=True)
    layer.data[7] = 0                                                   # corrected: erased slice 7
    layer.data[3] = 4                                                   # corrected: slice 3 all "right kidney"
    layer.data[10] = 0                                                  # later un-done: this too counts as edited
    widget._mode.value = MODES[1]
    assert widget._target.value is layer                                # the default: the proposal, not "truth"
    widget._lower.value = -400                                          # another window: slices will change
    _run(widget, qtbot)
    assert not layer.data[7].any() and (layer.data[3] == 4).all() and not layer.data[10].any()
    others = [z for z in range(16) if z not in (3, 7, 10)]
    assert not np.array_equal(layer.data[others], original[others])     # re-segmented with the new window
    layer.undo()
    assert not layer.data[7].any() and (layer.data[3] == 4).all()
    np.testing.assert_array_equal(layer.data[others], original[others])


def test_cancel_mid_run_adds_nothing(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    widget._batch.value = 1
    n_layers = len(viewer.layers)
    seen: list[int] = []

    def cancel_on_first(progress: Any) -> None:
        seen.append(progress.done)
        widget._cancel.clicked()

    widget._run.clicked()
    widget._worker.yielded.connect(cancel_on_first)
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert seen and seen[0] < 16
    assert len(viewer.layers) == n_layers
    assert "Cancelled" in widget._status.value and widget._progress.value == 0       # no stale progress
    viewer.add_points([[0, 0, 0]])                                      # the viewer still responds
    assert len(viewer.layers) == n_layers + 1
    assert widget._run.enabled


def test_wrong_kind_of_image_is_a_notification(make_napari_viewer, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget._start()
    assert "image layer" in errors[-1] and "image layer" in widget._status.value        # stays in the dock too
    viewer.add_image(synthetic_skin(seed=1, size=(64, 64)).image, name="photo", rgb=True)
    widget._image.value = viewer.layers["photo"]
    widget._model.value = "bundled CT demo (synthetic)"
    widget._start()                                                     # RGB into the CT model
    assert "RGB" in errors[-1] and "RGB" in widget._status.value and "Error" not in widget._status.value
    viewer.add_image(np.zeros((2, 3, 32, 32), np.float32), name="4d")
    widget._image.value = viewer.layers["4d"]
    widget._start()
    assert "shape" in errors[-1]
    assert [layer.name for layer in viewer.layers] == ["photo", "4d"] and not widget.running


def test_skin_photo_with_skin_model(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    sample = synthetic_skin(seed=5)
    viewer.add_image(sample.image, name="lesion", rgb=True)
    widget = SegmentWidget(viewer)
    widget._model.value = "bundled skin demo (synthetic)"
    widget._image.value = viewer.layers["lesion"]
    assert not widget._lower.visible                                   # no CT window for photos
    _run(widget, qtbot)
    labels = viewer.layers["lesion DAE-Former"].data
    assert labels.shape == (256, 256)
    assert dice_per_class(np.asarray(labels), sample.labels, 2)[0] > 0.9


def test_demo_opens_the_sample_with_the_widget(monkeypatch: pytest.MonkeyPatch, qtbot) -> None:  # type: ignore[no-untyped-def]
    """`daeformer demo` with a display: the viewer, the synthetic CT and the Segment dock (napari.run stubbed)."""
    import napari

    from napari_daeformer.plugin.widgets.launch import open_viewer_with_sample

    monkeypatch.setattr(napari, "run", lambda: None)
    open_viewer_with_sample()
    viewer = napari.current_viewer()
    try:
        assert [layer.name for layer in viewer.layers] == ["synthetic CT", "synthetic CT ground truth"]
        assert viewer.layers.selection.active.name == "synthetic CT"       # not the hidden ground truth
        viewer.window._qt_window.resize(1280, 900)
        qtbot.wait(300)                                                   # the dock takes its width, then the fit
        ct = viewer.layers["synthetic CT"]
        canvas = viewer.window._qt_viewer.canvas.size                     # (height, width) in screen pixels
        width_mm = ct.data.shape[2] * ct.scale[2]
        assert width_mm * viewer.camera.zoom <= canvas[1] + 1, (width_mm, viewer.camera.zoom, canvas)
    finally:
        viewer.close()


def test_one_segment_dock_whatever_the_path(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    """The dock the demo or the Fine-tune dock opens and the one the Plugins menu opens are the same dock (two
    identical, tabbed Segment docks before)."""
    from napari._app_model import get_app_model

    from napari_daeformer.plugin.widgets._docking import open_plugin_dock

    viewer = make_napari_viewer()
    widget = open_plugin_dock(viewer, "napari-daeformer.segment_widget")
    get_app_model().commands.execute_command("napari-daeformer.segment_widget").result()   # the Plugins menu
    docks = [name for name in viewer.window._wrapped_dock_widgets if name.startswith("Segment with DAE-Former")]
    assert docks == ["Segment with DAE-Former (DAE-Former)"]
    dock = viewer.window._wrapped_dock_widgets[docks[0]]
    dock.hide()
    assert open_plugin_dock(viewer, "napari-daeformer.segment_widget") is widget and not dock.isHidden()


def test_tiny_images_are_refused_and_constant_ones_warned(make_napari_viewer, errors: list[str], qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    for name, data in (("3x3", np.ones((3, 3), np.float32)), ("3x3x3", np.ones((3, 3, 3), np.float32))):
        viewer.add_image(data, name=name)
        widget._image.value = viewer.layers[name]
        widget._start()
        assert "too small" in errors[-1] and "8x8" in widget._status.value
    assert not widget.running and [layer.name for layer in viewer.layers] == ["3x3", "3x3x3"]
    viewer.add_image(np.zeros((4, 64, 64), np.float32), name="blank")
    widget._image.value = viewer.layers["blank"]
    _run(widget, qtbot)
    assert any("same value" in m for m in errors)                      # warned, and still segmented


def test_photo_controls_and_model_follow_the_image_kind(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_ct(seed=3, shape=(8, 96, 96)).image, name="CT")
    viewer.add_image(synthetic_skin(seed=5, size=(96, 96)).image, name="lesion", rgb=True)
    widget = SegmentWidget(viewer)
    widget._image.value = viewer.layers["CT"]
    assert widget._model.value == "bundled CT demo (synthetic)"
    assert not widget._axis.native.isHidden() and not widget._next.native.isHidden()
    _run(widget, qtbot)
    assert widget._next.enabled
    widget._image.value = viewer.layers["lesion"]                       # the fitting model, no slice controls
    assert widget._model.value == "bundled skin demo (synthetic)"
    assert widget._axis.native.isHidden() and widget._uncertain.native.isHidden() and widget._next.native.isHidden()
    _run(widget, qtbot)
    assert not widget._next.enabled and widget._uncertain_order == []  # no stale order from the volume
    assert viewer.layers["lesion DAE-Former"].opacity < 0.5             # the lesion stays visible under its mask
    assert "pixels" in widget._status.value                            # a layer without a resolution
    widget._model.native.activated.emit(0)                             # the user picks a model: never switched again
    widget._model.value = "bundled CT demo (synthetic)"
    widget._image.value = viewer.layers["CT"]
    widget._image.value = viewer.layers["lesion"]
    assert widget._model.value == "bundled CT demo (synthetic)"


def test_both_docks_fit_a_1920x1080_screen(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    from qtpy.QtWidgets import QPushButton

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1920, 1080)
    viewer.add_image(synthetic_ct(seed=3, shape=(8, 96, 96)).image, name="CT")
    _, segment = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    _, tune = viewer.window.add_plugin_dock_widget("napari-daeformer", "Fine-tune DAE-Former")
    assert window.height() <= 1080                                     # the docks did not push the window taller

    def unseen() -> list[tuple[str, int, int]]:
        """Buttons below the window's edge or partly hidden (the docks settle ~100 ms after opening)."""
        missing = []
        for dock in (segment, tune):
            for button in dock.native.findChildren(QPushButton):
                if not button.isVisibleTo(window) or not button.text():   # hidden, or folded in a section
                    continue
                bottom = button.mapTo(window, button.rect().bottomLeft()).y()
                seen = button.visibleRegion().boundingRect().height()
                if bottom > window.height() or seen != button.height():
                    missing.append((button.text(), bottom, seen))
        return missing
    qtbot.waitUntil(lambda: not unseen(), timeout=3000)


def test_precision_reaches_the_engine_and_a_refused_one_is_a_notification(ct_viewer, qtbot, errors) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    widget._device.value = "cpu"
    widget._precision.value = "fp32"
    _run(widget, qtbot)
    assert widget.last_result.segmentation.numeric_path == "fp32"
    n_layers = len(viewer.layers)
    widget._precision.value = "fp16"                                   # autocast fp16 exists on GPUs only
    _run(widget, qtbot)
    assert "fp16 autocast is not supported on the CPU" in errors[-1]
    assert len(viewer.layers) == n_layers                              # the failed run's empty layer is gone


def _saved_session(widget: SegmentWidget, layer: Any, qtbot) -> Any:  # type: ignore[no-untyped-def]
    from napari_daeformer.session.annotation import load_session

    saver = widget.autosavers[layer.unique_id]
    saver.save_now()                                  # what the pause timer does (tests/widgets/test_autosave.py)
    qtbot.waitUntil(lambda: saver.pending.done(), timeout=20_000)
    return load_session(saver.path)


@pytest.mark.parametrize("change", ["switched", "deleted"])
def test_image_switched_or_deleted_mid_run_autosaves_under_the_run_image(ct_viewer, qtbot, change: str) -> None:  # type: ignore[no-untyped-def]
    """The session is the run's own: it belongs to the image the run started on, whatever is selected (or left)
    when it ends."""
    from napari_daeformer.session.annotation import image_key

    viewer, widget = ct_viewer
    ct = viewer.layers["CT"]
    key = image_key(np.asarray(ct.data))
    viewer.add_image(np.zeros((16, 160, 160, 3), np.uint8), name="photo", rgb=True)
    widget._run.clicked()
    if change == "switched":
        widget._image.value = viewer.layers["photo"]
    else:
        viewer.layers.remove(ct)
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    layer = viewer.layers["CT DAE-Former"]
    saved = _saved_session(widget, layer, qtbot)
    assert saved.annotation.image.key == key and saved.annotation.image.name == "CT"
    assert saved.labels.any() and np.array_equal(saved.labels, layer.data)


def test_two_labels_layers_on_one_image_keep_two_sessions(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    _run(widget, qtbot)
    first = viewer.layers["CT DAE-Former"]
    first.data_setitem((np.array([3]), np.array([5]), np.array([5])), 2)
    _run(widget, qtbot)
    second = viewer.layers[-1]
    a, b = _saved_session(widget, first, qtbot), _saved_session(widget, second, qtbot)
    assert a.path != b.path and a.annotation.id != b.annotation.id
    assert np.flatnonzero(a.annotation.corrected(a.labels)).tolist() == [3]
    assert not b.annotation.corrected(b.labels).any()


def test_labels_deleted_mid_run_cancels_it(ct_viewer, qtbot, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    widget._run.clicked()
    viewer.layers.remove(viewer.layers["CT DAE-Former"])
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    assert "CT DAE-Former" not in viewer.layers and widget.autosavers == {}
    assert widget._status.value.startswith("Cancelled") and errors == []


def test_closing_the_viewer_mid_run_raises_nothing(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    """pytest-qt fails the test on any exception raised in a Qt callback (deleted widgets touched after close)."""
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_ct(seed=3, shape=(24, 160, 160)).image, name="CT")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    widget._run.clicked()
    worker = widget._worker
    qtbot.wait(300)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=60_000)
    qtbot.wait(200)
    assert widget.closed


def test_the_slice_on_screen_fills_first(ct_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, widget = ct_viewer
    viewer.dims.set_current_step(0, 11)
    filled: list[list[int]] = []
    original = widget._show_progress
    widget._show_progress = lambda target, p: (filled.append(p.slices.tolist()) if p.slices is not None else None,
                                               original(target, p))
    _run(widget, qtbot)
    assert filled[0][0] in (10, 11) and 11 in filled[0]


def test_sample_photo_reports_pixels_and_a_reversed_window_is_refused(make_napari_viewer, qtbot,  # type: ignore[no-untyped-def]
                                                                      errors: list[str]) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-daeformer", "synthetic_skin")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    widget._image.value = viewer.layers["synthetic skin"]
    _run(widget, qtbot)
    assert "pixels" in widget._status.value and "mm²" not in widget._status.value   # as the same photo as PNG
    viewer.add_image(synthetic_ct(seed=3, shape=(8, 96, 96)).image, name="CT")
    widget._image.value = viewer.layers["CT"]
    widget._lower.value, widget._upper.value = 300, 100
    n = len(viewer.layers)
    widget._run.clicked()
    assert "must be below its high end" in errors[-1] and not widget.running and len(viewer.layers) == n
