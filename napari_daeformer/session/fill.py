"""Fill between slices: the slices between those the user painted, filled per class by morphological contour
interpolation (Albu et al., IEEE TMI 2008; ITK's `MorphologicalContourInterpolator`, what 3D Slicer's *Fill between
slices* runs). A painted slice is the truth, also where it holds no label ("nothing here"), and is never changed; a
slice outside the painted range is left as it is (the method does not extrapolate); the unpainted slices between
are replaced by the interpolation. A viewer runs it in a child process (`fill_in_child`)."""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

import numpy as np

from napari_daeformer.base.errors import DaeformerError

if TYPE_CHECKING:
    from napari_daeformer.session.fill_child import FillChild

MAX_LABEL = 65535
_child: FillChild | None = None      # started on first use, serves every later fill of this process (one at a time)
_child_lock = threading.Lock()


class FillError(DaeformerError):
    """The labels cannot be filled between slices; the message says why in one line."""


def fill_between(labels: np.ndarray, painted: np.ndarray, axis: int = 0) -> np.ndarray:
    """([Z, Y, X]) labels with the unpainted slices between painted ones along `axis` interpolated per class.

    Args:
        labels: (Z, Y, X) integer label map.
        painted: (labels.shape[axis],) bool, the slices the user painted.
        axis: the slice axis.
    Returns:
        A new (Z, Y, X) array of `labels`' dtype; `labels` is not modified.
    """
    labels, painted = np.asarray(labels), np.asarray(painted, bool)
    values, between = check_fill(labels, painted, axis)
    if not between.any():
        return labels.copy()
    stack = np.moveaxis(labels, axis, 0)
    filled = _interpolate(stack, np.flatnonzero(painted), values)
    out = stack.copy()
    out[between] = filled[between].astype(labels.dtype)
    return np.moveaxis(out, 0, axis)


def fill_in_child(labels: np.ndarray, painted: np.ndarray, axis: int = 0) -> np.ndarray:
    """`fill_between` in a child process (`session.fill_child`), for a caller whose other threads must keep running
    (a viewer): ITK's wrappers hold the GIL while they load (up to 5.4 s at a stretch measured, 18 s in all on a busy
    CPU), which froze the viewer though the fill ran on a worker thread. Waiting for the child's answer releases
    the GIL. The child starts on first use and serves every later call of this process."""
    from napari_daeformer.session.fill_child import FillChild

    global _child
    with _child_lock:
        if _child is None or not _child.alive:
            _child = FillChild()
        return _child.fill(np.asarray(labels), np.asarray(painted, bool), axis)


def check_fill(labels: np.ndarray, painted: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Refuse (FillError, one line) what `fill_between` cannot fill; else the label values painted and the (S,)
    bool slices it will fill (unpainted, between the first and last painted)."""
    if labels.ndim != 3:
        raise FillError(f"fill between slices needs a volume; these labels are {labels.ndim}D")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FillError(f"labels must be whole numbers, got {labels.dtype}")
    if painted.shape != (labels.shape[axis],):
        raise FillError(f"{painted.shape[0] if painted.ndim == 1 else painted.shape} painted flags for "
                        f"{labels.shape[axis]} slices")
    index = np.flatnonzero(painted)
    if len(index) < 2:
        raise FillError(f"paint at least two slices to fill between them ({len(index)} painted)")
    stack = np.moveaxis(labels, axis, 0)
    values = np.unique(stack[index])
    values = values[values != 0]
    if not values.size:
        raise FillError("the painted slices hold no label: paint the structure on at least two slices")
    if values.min() < 0 or values.max() > MAX_LABEL:
        raise FillError(f"label values must be 0..{MAX_LABEL}, got {int(values.min())}..{int(values.max())}")
    between = np.zeros(len(stack), bool)
    between[index[0]:index[-1] + 1] = True
    return values, between & ~painted


def _interpolate(stack: np.ndarray, painted: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(Z, Y, X) the slices between consecutive `painted` slices of `stack` filled: each label in `values` present on
    both slices of a gap is interpolated between them on its own (a binary image through ITK's interpolator); a label
    on one side only is not carried into the gap (nothing is invented). Where two labels' interpolations overlap,
    the smaller structure keeps the voxel (a lesion inside an organ stays inside it).

    One binary gap at a time, and never ITK's custom slice positions: its multi-label and custom-position modes
    corrupted the heap on 16 x 128 x 128 phantoms (about half of the runs crashed the process at exit), the binary
    two-slice mode never did (docs/annotate.md)."""
    out = np.zeros_like(stack)
    order = sorted(values.tolist(), key=lambda v: -int(np.count_nonzero(stack[painted] == v)))
    for a, b in zip(painted[:-1], painted[1:]):
        if b - a < 2:
            continue
        for value in order:
            ends = stack[[a, b]] == value
            if ends[0].any() and ends[1].any():
                gap = np.zeros((b - a + 1, *stack.shape[1:]), np.uint8)
                gap[0], gap[-1] = ends
                out[a + 1:b][_contour_interpolation(gap)[1:-1] > 0] = value
    return out


def _contour_interpolation(gap: np.ndarray) -> np.ndarray:
    """(n, Y, X) uint8 binary `gap`, its first and last slices painted, interpolated along axis 0 by ITK."""
    with warnings.catch_warnings():                          # SWIG's DeprecationWarnings as ITK loads lazily
        warnings.simplefilter("ignore", DeprecationWarning)
        import itk

        interpolator = itk.MorphologicalContourInterpolator.New(itk.image_from_array(np.ascontiguousarray(gap)))
        interpolator.SetAxis(2)                              # ITK orders axes x, y, z: numpy's axis 0 is ITK's 2
        interpolator.Update()
        return np.asarray(itk.array_from_image(interpolator.GetOutput()))
