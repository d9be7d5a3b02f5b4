"""A learned proposal joined to fill between slices: interpolation where it is defined, the model beyond it, and a
structure looked for only where it continues from what the user painted.

A new model trained on a few painted slices proposes every slice, but on the slices between painted ones the
interpolation of the user's own outlines is at least as good (docs/annotate.md), and far from them the model's
false positives cost more to clear than the structure it finds (a lesion predicted on 39 of 61 slices). So: the
painted slices as painted, the slices between them filled (`session.fill`), and beyond the painted range each class
of the model's proposal kept only in its 3D components that touch that class on the painted or filled slices.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .fill import check_fill, fill_between


def anchored_proposal(proposal: np.ndarray, labels: np.ndarray, painted: np.ndarray, axis: int = 0) -> np.ndarray:
    """(Z, Y, X) labels: `labels` on the `painted` slices, fill between slices from them inside the painted range,
    and `proposal` beyond it where each class is connected (6-connected, in 3D) to the same class inside the range.

    Args:
        proposal: (Z, Y, X) a model's labels for every slice.
        labels: (Z, Y, X) the user's labels, right on the `painted` slices.
        painted: (Z,) bool along `axis`, at least two painted slices holding a label (`check_fill`).
    """
    check_fill(labels, painted, axis)
    inside = np.moveaxis(fill_between(labels, painted, axis), axis, 0)
    model = np.moveaxis(np.asarray(proposal), axis, 0)
    index = np.flatnonzero(painted)
    beyond = np.ones(len(inside), bool)
    beyond[index[0]:index[-1] + 1] = False
    out = inside.copy()
    out[beyond] = 0
    for value in np.unique(model[beyond]):
        if value == 0:
            continue
        seeds = (inside == value) & ~beyond[:, None, None]
        if not seeds.any():
            continue
        grown = seeds | ((model == value) & beyond[:, None, None])
        components, _ = ndimage.label(grown)
        kept = np.isin(components, np.unique(components[seeds]))
        out[kept & beyond[:, None, None]] = value
    return np.moveaxis(out, 0, axis)
