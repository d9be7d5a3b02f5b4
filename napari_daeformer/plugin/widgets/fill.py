"""Fill between slices on a labels layer, in the viewer: one undo step, along the axis the user painted, the
painted slices untouched (`session.fill`). Bound to Shift+I on every labels layer the plugin follows and to the
Fine-tune dock's *Fill between slices* button."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info, show_warning

from napari_daeformer.base.errors import DaeformerError, first_line
from napari_daeformer.plugin.widgets._layers import engine_writes, follow, painting_axis
from napari_daeformer.session.fill import check_fill, fill_in_child

if TYPE_CHECKING:
    import napari
    from napari.qt.threading import FunctionWorker

KEY = "Shift-I"


def painted_slices(viewer: napari.Viewer, layer: napari.layers.Labels) -> tuple[np.ndarray, int]:
    """(S,) bool, the slices of `layer` the user painted, and the axis they painted along (the one on screen before
    any painting)."""
    annotation = follow(viewer, layer)
    data = np.asarray(layer.data)
    axis = annotation.painted_axis() if annotation.touched else painting_axis(viewer, layer)
    if data.ndim != 3:
        return np.ones(1, bool), 0
    return annotation.painted(data, axis), axis


def apply_fill(layer: napari.layers.Labels, before: np.ndarray, filled: np.ndarray) -> int:
    """Write `filled` into `layer` as one undoable edit, where the layer still holds `before` (what the user painted
    meanwhile is kept); how many voxels changed."""
    current = np.asarray(layer.data)
    changed = np.nonzero((filled != before) & (current == before))
    if changed[0].size:
        with engine_writes(layer):                                   # filled, not painted by the user
            layer.data_setitem(changed, filled[changed])
    return int(changed[0].size)


def fill_action(viewer: napari.Viewer, layer: napari.layers.Labels) -> FunctionWorker | None:
    """Fill `layer` between its painted slices in a child process (ITK holds the GIL for seconds as it loads), then write it
    as one undoable edit; the outcome as a napari notification. None where there is nothing to start."""
    before = np.array(layer.data, copy=True)
    painted, axis = painted_slices(viewer, layer)
    try:
        check_fill(before, painted, axis)
    except DaeformerError as e:
        show_warning(f"DAE-Former: {e}")
        return None
    worker = create_worker(fill_in_child, before, painted, axis, _start_thread=False)

    def done(filled: np.ndarray) -> None:
        n = apply_fill(layer, before, filled)
        show_info(f"DAE-Former: filled between the painted slices of {layer.name} ({n} voxels changed; Ctrl+Z "
                  "undoes it)" if n else f"DAE-Former: nothing to fill between the painted slices of {layer.name}")

    worker.returned.connect(done)
    worker.errored.connect(lambda e: show_warning(f"DAE-Former: fill between slices failed: {first_line(e)}"))
    worker.start()
    return worker


def bind_fill_key(viewer: napari.Viewer, layer: napari.layers.Labels) -> None:
    """Shift+I on `layer` fills between its painted slices."""
    layer.bind_key(KEY, lambda current: fill_action(viewer, current), overwrite=True)
