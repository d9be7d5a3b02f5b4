"""Thread glue shared by the widgets: run a generator job in a napari worker, Run/Cancel button states,
and errors that reach the user instead of vanishing."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.qt.threading import GeneratorWorker, create_worker

from ..errors import DaeformerError

MAX_WIDTH = 460


def device_picker() -> ComboBox:
    """The device choice every widget offers."""
    return ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto",
                    tooltip="auto: CUDA GPU, then Apple MPS, then CPU")


def failure_message(error: BaseException) -> str:
    """Our errors speak for themselves; anything else is named by its type."""
    return str(error) if isinstance(error, DaeformerError) else f"{type(error).__name__}: {error}"


def guarded(job: Callable[..., Generator[Any, None, Any]], error: type[DaeformerError], what: str
            ) -> Callable[..., Generator[Any, None, Any]]:
    """`job` with torch's RuntimeErrors (out of memory included) raised as `error`: superqt's generator workers
    drop RuntimeErrors silently, so the user would never see the failure."""
    def run(*args: Any) -> Generator[Any, None, Any]:
        try:
            return (yield from job(*args))
        except RuntimeError as e:
            raise error(f"{what} failed: {str(e).splitlines()[0]}") from e
    return run


class WorkerWidget(Container):
    """A dock widget that runs one background job at a time between its Run and Cancel buttons."""

    _run: PushButton
    _cancel: PushButton

    def __init__(self) -> None:
        super().__init__(labels=True)
        self._worker: GeneratorWorker | None = None
        self.max_width = MAX_WIDTH                       # a dock column, not half the window

    @staticmethod
    def _wrap(label: Label) -> Label:
        """A label whose long messages wrap inside the dock instead of widening it."""
        label.native.setWordWrap(True)
        return label

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _launch(self, job: Callable[..., Generator[Any, None, Any]], *args: Any, yielded: Callable[[Any], None],
                returned: Callable[[Any], None], errored: Callable[[BaseException], None],
                aborted: Callable[[], None] | None = None) -> GeneratorWorker:
        self._worker = create_worker(job, *args, _start_thread=False, _ignore_errors=True)
        self._worker.yielded.connect(yielded)
        self._worker.returned.connect(returned)
        self._worker.errored.connect(errored)
        if aborted is not None:
            self._worker.aborted.connect(aborted)
        self._worker.finished.connect(self._idle)
        self._run.enabled, self._cancel.enabled = False, True
        self._worker.start()
        return self._worker

    def _idle(self) -> None:
        self._run.enabled, self._cancel.enabled = True, False
        self._worker = None
