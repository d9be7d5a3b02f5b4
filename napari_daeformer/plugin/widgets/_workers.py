"""Thread glue shared by the widgets: run a generator job in a napari worker, Run/Cancel button states,
and errors that reach the user instead of vanishing."""

from __future__ import annotations

import html
from collections.abc import Callable, Generator
from typing import Any

from magicgui.widgets import ComboBox, Container, EmptyWidget, Label, PushButton, Widget
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QWidget

from napari_daeformer.base import collector
from napari_daeformer.base.errors import DaeformerError, first_line
from napari_daeformer.plugin.widgets._docking import FitOnShow
from napari_daeformer.plugin.widgets.private_api import hide_empty_labels, pack_to_top

MAX_WIDTH = 460
DOCK_WIDTH = 420                  # wide enough for every row of the three docks, scroll bar included
MIN_HEIGHT = 250                  # three docks stacked never grow a 1000-pixel window (a third is tabbed: _docking)


def device_picker() -> ComboBox:
    """The device choice every widget offers."""
    return ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto",
                    tooltip="auto: CUDA GPU, then Apple MPS, then CPU")


def failure_message(error: BaseException) -> str:
    """The error in words: its message (the type's name only when there is none)."""
    return first_line(error, f"unexpected {type(error).__name__}")


def guarded(job: Callable[..., Generator[Any, None, Any]], error: type[DaeformerError], what: str
            ) -> Callable[..., Generator[Any, None, Any]]:
    """`job` with torch's RuntimeErrors (out of memory included) raised as `error`: superqt's generator workers
    drop RuntimeErrors silently, so the user would never see the failure."""
    def run(*args: Any) -> Generator[Any, None, Any]:
        try:
            return (yield from job(*args))
        except RuntimeError as e:
            raise error(f"{what} failed: {first_line(e)}") from e
    return run


def row(*widgets: Widget) -> Container:
    """Widgets side by side in one row of a dock (e.g. Run and Cancel)."""
    container = Container(layout="horizontal", widgets=widgets, labels=False,
                          tooltip=" / ".join(w.tooltip or "" for w in widgets))
    container.margins = (0, 0, 0, 0)
    return container


def holder(child: QWidget, tooltip: str) -> EmptyWidget:
    """A plain Qt widget (a plot, a collapsible section) as one full-width row of a magicgui container."""
    widget = EmptyWidget(tooltip=tooltip)
    layout = widget.native.layout()
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(child)
    return widget


def collapsible(title: str, widgets: list[Widget]) -> EmptyWidget:
    """A section of settings folded away under `title` until the user opens it."""
    from superqt import QCollapsible

    section = QCollapsible(title)
    section.setContentsMargins(0, 0, 0, 0)
    inner = Container(widgets=widgets, labels=True)
    inner.margins = (0, 0, 0, 0)
    section.addWidget(inner.native)
    section.collapse(animate=False)
    holder_widget = holder(section, f"{title}: click to show or hide")
    holder_widget._section = inner                 # keep the magicgui container (and its signals) alive
    return holder_widget


class WorkerWidget(Container):
    """A dock widget that runs one background job at a time between its Run and Cancel buttons."""

    _run: PushButton
    _cancel: PushButton

    _status: Label

    def __init__(self) -> None:
        super().__init__(labels=True, scrollable=True)   # docks stacked on a small screen scroll, never clip
        self._worker: GeneratorWorker | None = None
        self.max_width = MAX_WIDTH                       # a dock column, not half the window
        self.closed = False                              # the dock's Qt widgets are gone (the viewer was closed)
        self.root_native_widget.destroyed.connect(lambda *_: self._on_closed())
        self._fit = FitOnShow(self.root_native_widget)   # a third dock is tabbed, not stacked past the window

    def _on_closed(self) -> None:
        """The dock is being deleted: stop its job; its callbacks must not touch the deleted widgets."""
        self.closed = True
        self.cancel()

    def cancel(self) -> None:
        """Stop the running job (after its current step)."""
        if self._worker is not None:
            self._worker.quit()

    @property
    def native(self) -> QWidget:
        """The scroll area around the widgets: napari docks `native`, and magicgui's own `native` is the widget
        inside it, which would drop the scrolling."""
        return self.root_native_widget

    def _tidy(self) -> None:
        """Call at the end of `__init__`: unlabelled rows span the dock, rows sit at the top, and the dock is as wide
        as its content."""
        hide_empty_labels(self)
        inner = pack_to_top(self)
        root = self.root_native_widget
        root.setMinimumWidth(DOCK_WIDTH)
        root.setMinimumHeight(min(inner.sizeHint().height() + 30, MIN_HEIGHT))

    def report(self, message: str, title: str = "DAE-Former") -> None:
        """An error before or during a run: in the status text, which stays, and in a notification."""
        self._status.value = html.escape(message)
        show_error(f"{title}: {message}")

    def ask(self, message: str, title: str = "DAE-Former") -> None:
        """Something the user must fill in before a run (not an error): in the status text and an information."""
        self._status.value = html.escape(message)
        show_info(f"{title}: {message}")

    @staticmethod
    def _wrap(label: Label) -> Label:
        """A label whose long messages wrap inside the dock instead of widening it; always rich text, so what is
        set is escaped where it carries names from files or layers (an HTML class name stays text)."""
        label.native.setWordWrap(True)
        label.native.setTextFormat(Qt.RichText)
        label.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        return label

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _launch(self, job: Callable[..., Generator[Any, None, Any]], *args: Any, yielded: Callable[[Any], None],
                returned: Callable[[Any], None], errored: Callable[[BaseException], None],
                aborted: Callable[[], None] | None = None) -> GeneratorWorker:
        def alive(callback: Callable[..., None]) -> Callable[..., None]:
            return lambda *a: None if self.closed else callback(*a)
        self._worker = create_worker(job, *args, _start_thread=False, _ignore_errors=True)
        self._worker.yielded.connect(alive(yielded))
        self._worker.returned.connect(alive(returned))
        self._worker.errored.connect(alive(errored))
        if aborted is not None:
            self._worker.aborted.connect(alive(aborted))
        self._worker.finished.connect(alive(self._idle))
        self._worker.finished.connect(collector.thaw)         # whether or not the dock is still open
        self._run.enabled, self._cancel.enabled = False, True
        collector.freeze()              # while it runs, full collections skip the viewer's objects (base/collector.py)
        self._worker.start()
        return self._worker

    def _idle(self) -> None:
        self._run.enabled, self._cancel.enabled = True, False
        self._worker = None
