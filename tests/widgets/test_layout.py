"""The three docks opened from the Plugins menu at the screen sizes users have: the window does not grow, and each
dock's buttons, verdict and table columns are on screen without scrolling."""

from __future__ import annotations

import pytest
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QDockWidget, QTabBar, QWidget

from napari_daeformer.io.sample_data import synthetic_ct
from napari_daeformer.plugin.widgets.batch import COLUMNS
from napari_daeformer.tasks.summary import FileResult

from .conftest import from_plugins_menu

pytestmark = pytest.mark.gui


def _on_screen(widget: QWidget, window: QWidget) -> bool:
    """Shown, not scrolled away or hidden behind a tab, and inside the window."""
    top_left = widget.mapTo(window, widget.rect().topLeft())
    bottom_right = widget.mapTo(window, widget.rect().bottomRight())
    return (widget.isVisible() and not widget.visibleRegion().isEmpty() and window.rect().contains(top_left)
            and window.rect().contains(bottom_right))


def _shown(qtbot, widget: QWidget, window: QWidget) -> None:  # type: ignore[no-untyped-def]
    """`widget` comes on screen within 2 s (the docks settle 100 ms after each one opens)."""
    qtbot.waitUntil(lambda: _on_screen(widget, window), timeout=2000)


def _dock(widget: QWidget) -> QDockWidget:
    parent = widget.parentWidget()
    while not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


@pytest.mark.parametrize("size", [(1600, 1000), (1920, 1080)])
def test_three_docks_fit_the_window(make_napari_viewer, qtbot, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*size)
    viewer.add_image(synthetic_ct(seed=0, shape=(8, 96, 96)).image, name="abdomen")
    docks = {name: from_plugins_menu(name) for name in ("segment_widget", "finetune_widget", "batch_widget")}
    segment, tune, batch = docks.values()
    batch.results = [FileResult(input="photos/a_rather_long_folder_name/lesion_0001.png", output="", status="failed",
                                reason="not an image napari-daeformer can read"),
                     FileResult(input="ct0.nii.gz", output="ct0.nii.gz", status="done", seconds=3.2,
                                measures={"liver": 166.5}, unit="mL", mean_entropy=0.0231)]
    batch._show_table()
    qtbot.wait(500)                                                     # the docks are compacted 100 ms after
    assert (window.width(), window.height()) == size                    # the third dock did not grow the window

    for widget in (segment._run, segment._cancel, segment._progress, segment._status, segment._image):
        _shown(qtbot, widget.native, window)
    for dock in (tune, batch):                                          # tabbed together: the user picks the tab
        _dock(dock.native).raise_()
        QApplication.processEvents()
        qtbot.wait(100)
        for widget in (dock._run, dock._cancel, segment._run):          # Segment stays in view beside either
            _shown(qtbot, widget.native, window)
    _dock(tune.native).raise_()
    qtbot.wait(100)
    for widget in (tune._progress, tune._resegment, tune._revert, tune._corrected, tune._start_from):
        _shown(qtbot, widget.native, window)

    _dock(batch.native).raise_()
    qtbot.wait(100)
    bars = [b for b in window.findChildren(QTabBar) if b.isVisible() and b.count() > 1]
    assert bars and all(b.elideMode() == Qt.TextElideMode.ElideNone for b in bars)     # whole titles, scrolled
    table = batch._table.native
    _shown(qtbot, table, window)
    _shown(qtbot, batch._open.native, window)
    header, width = table.horizontalHeader(), table.viewport().width()
    for j, name in enumerate(COLUMNS[:-1]):                             # every column whole but the last ...
        assert header.sectionViewportPosition(j) + header.sectionSize(j) <= width, (name, width)
    assert header.sectionViewportPosition(COLUMNS.index("reason")) < width - 40    # ... which begins on screen
    assert header.length() <= width                                     # and ends there: no sideways scrolling
    failed = [r.status for r in batch.results].index("failed")
    assert "lesion_0001.png" in table.item(failed, 0).toolTip()
    assert "can read" in table.item(failed, COLUMNS.index("reason")).toolTip()


def test_the_segment_dock_a_finetune_dock_opens_shows_its_run_button(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    """Fine-tune opened first from the menu, then the Segment dock it opens itself (to hand it a model): the dock
    just opened shows its buttons, and the Fine-tune dock above it keeps its Train button in view."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.add_image(synthetic_ct(seed=0, shape=(8, 96, 96)).image, name="abdomen")
    tune = from_plugins_menu("finetune_widget")
    qtbot.wait(300)
    segment = tune.segment_widget()
    qtbot.wait(500)                                                     # compacted 100 ms after it opens
    assert (window.width(), window.height()) == (1600, 1000)
    for widget in (segment._run, segment._cancel, segment._progress, tune._run, tune._cancel):
        _shown(qtbot, widget.native, window)


def test_the_qt_binding_is_the_one_asked_for(qapp) -> None:  # type: ignore[no-untyped-def]
    """PyQt5 unless QT_API names another: pytest-qt on its own would pick PyQt6 whenever both are installed."""
    import os

    import qtpy

    assert qtpy.API_NAME.lower() == os.environ.get("QT_API", "pyqt5").lower()
