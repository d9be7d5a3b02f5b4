"""Which slices of a labels layer the user has corrected: the input of fine-tuning and of partial re-runs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != axis % mask.ndim)
    return mask.any(axis=other)


def corrected_slices(current: np.ndarray, prediction: np.ndarray | None, axis: int = 0) -> np.ndarray:
    """(S,) bool: slices along `axis` where `current` differs from the model's `prediction`.

    Without a prediction (a layer painted from scratch), every slice holding any label counts.
    A 2D map is one slice.
    """
    if current.ndim == 2:
        current = current[None]
        prediction = None if prediction is None else prediction[None]
        axis = 0
    if prediction is None:
        return _per_slice(current != 0, axis)
    if prediction.shape != current.shape:
        raise ValueError(f"prediction {prediction.shape} and labels {current.shape} differ in shape")
    return _per_slice(current != prediction, axis)


def edited_slices(labels: np.ndarray, prediction: np.ndarray | None, touched: Iterable[int] = ()) -> np.ndarray:
    """(S,) bool along axis 0: slices that differ from the model's `prediction` or that the user painted
    (`touched`, slice indices; ignored without a prediction, where every slice holding a label counts)."""
    changed = corrected_slices(labels, prediction, 0)
    if prediction is not None:
        for z in touched:
            if 0 <= z < len(changed):
                changed[z] = True
    return changed


def touched_slices(atom: object, axis: int = 0) -> set[int]:
    """Slices along `axis` that one napari Labels history atom changed.

    An atom is either a masked paint edit (with a `slice_key` bounding box) or an
    `(indices, old_values, new_values)` tuple from `data_setitem`.
    """
    key = getattr(atom, "slice_key", None)
    if key is not None:
        s = key[axis]
        return set(range(s.start or 0, s.stop)) if isinstance(s, slice) else {int(s)}
    indices = atom[0]  # type: ignore[index]
    return {int(i) for i in np.unique(np.asarray(indices[axis]))}


def merge_slices(base: np.ndarray, new: np.ndarray, replace: np.ndarray, axis: int = 0) -> np.ndarray:
    """A copy of `base` whose slices along `axis` flagged in `replace` (S,) bool come from `new`."""
    merged = np.array(base, copy=True)
    np.moveaxis(merged, axis, 0)[replace] = np.moveaxis(new, axis, 0)[replace]
    return merged
