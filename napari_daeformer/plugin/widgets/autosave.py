"""Background autosave of a labels layer made by Segment: after a pause in painting, and at least every few minutes
while edits keep coming. The arrays are copied on the GUI thread (milliseconds); compression and the atomic write
run on a worker thread, so the viewer never waits for the disk."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer

from napari_daeformer.base.errors import first_line
from napari_daeformer.session.annotation import Annotation, save_session

if TYPE_CHECKING:
    from napari.layers import Labels

    from napari_daeformer.plugin.hub import Hub

PAUSE_S = 2.0                 # quiet time after the last stroke before saving
INTERVAL_S = 180.0            # while painting without pause, save at least this often


class Autosaver:
    """Keeps `path` (the annotation's own session file) up to date with `layer` and its `annotation`."""

    def __init__(self, layer: Labels, annotation: Annotation, path: Path, pause_s: float = PAUSE_S,
                 interval_s: float = INTERVAL_S) -> None:
        self.layer, self.annotation, self.path = layer, annotation, path
        self.interval_s = interval_s
        self.timer = QTimer()
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(pause_s * 1000))
        self.timer.timeout.connect(self.save_now)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daeformer-autosave")
        self.last_save = time.monotonic()
        self.pending: Future[Path] | None = None
        self.error: str | None = None
        layer.events.paint.connect(self._edited)
        layer.events.set_data.connect(self._edited)

    def _edited(self, _: Any = None) -> None:
        if time.monotonic() - self.last_save > self.interval_s:
            self.save_now()
        else:
            self.timer.start()                        # restarts: saves once painting pauses

    def snapshot(self) -> tuple[Annotation, np.ndarray]:
        """The annotation and labels now (copies: painting may go on while the copy is written)."""
        a = self.annotation
        copy = dataclasses.replace(a, prediction=None if a.prediction is None else np.array(a.prediction, copy=True),
                                   touched={axis: set(zs) for axis, zs in a.touched.items()})
        return copy, np.array(self.layer.data, copy=True)

    def save_now(self) -> Future[Path]:
        """Queue a save of the current state; a failure is reported once, on the GUI thread, at the next save."""
        self.timer.stop()
        if self.error is not None:
            show_warning(f"DAE-Former: autosave to {self.path.parent} failed: {self.error}")
            self.error = None
        self.last_save = time.monotonic()
        self.pending = self.writer.submit(save_session, self.path, *self.snapshot())
        self.pending.add_done_callback(self._written)
        return self.pending

    def _written(self, future: Future[Path]) -> None:
        if (e := future.exception()) is not None:
            self.error = first_line(e)

    def close(self) -> None:
        """Stop following the layer; a save under way completes."""
        self.timer.stop()
        for event in (self.layer.events.paint, self.layer.events.set_data):
            event.disconnect(self._edited)
        self.writer.shutdown(wait=True)


def autosave(hub: Hub, layer: Labels, annotation: Annotation, path: Path) -> Autosaver:
    """A new autosaver of `layer` into `path`, recorded in the viewer's `hub` (which layer is autosaved into which
    file, so that no other dock saves it twice), written once now."""
    saver = Autosaver(layer, annotation, path)
    hub.autosaved[layer.unique_id] = path
    saver.save_now()
    return saver
