"""Which proposal an unpainted slice shows while teaching: the model's, or what fill between slices shows there
(the interpolation between the nearest painted slices above and below, nothing beyond them), whichever needed
fewer changes on the last slices the user finished. A model that proposes a small lesion on empty slices, or an
organ worse than interpolation close to painted slices, gives way to fill until it does better again; the choice
rests on the user's own corrections, not on a tuned rule (docs/annotate.md#model-or-fill).
Plain Python: no Qt, no napari."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

import numpy as np

from napari_daeformer.session.fill import fill_between

WINDOW = 3            # finished slices the choice looks back on: recent, as the model changes round by round
Source = Literal["model", "fill"]


def fill_slices(labels: np.ndarray, painted: np.ndarray, slices: np.ndarray,
                fill: Callable[[np.ndarray, np.ndarray], np.ndarray] = fill_between) -> np.ndarray:
    """(n, Y, X) what fill between slices shows on `slices` (n,) of the (S, Y, X) `labels` painted on `painted`
    (S,): each slice between two painted ones interpolated from the nearest two, every other slice empty. `fill`
    runs the interpolation (`session.fill.fill_in_child` in a viewer)."""
    labels, painted = np.asarray(labels), np.asarray(painted, bool)
    out = np.zeros((len(slices), *labels.shape[1:]), labels.dtype)
    index = np.flatnonzero(painted)
    gaps: dict[tuple[int, int], list[int]] = {}             # (painted below, painted above) -> indices into slices
    for n, z in enumerate(np.asarray(slices, int)):
        below, above = index[index < z], index[index > z]
        if below.size and above.size and not painted[z]:
            gaps.setdefault((int(below[-1]), int(above[0])), []).append(n)
    for (a, b), wanted in gaps.items():
        if labels[[a, b]].any():
            ends = np.zeros(b - a + 1, bool)
            ends[[0, -1]] = True
            gap = np.zeros((b - a + 1, *labels.shape[1:]), labels.dtype)
            gap[0], gap[-1] = labels[a], labels[b]
            out[wanted] = fill(gap, ends)[np.asarray(slices, int)[wanted] - a]
    return out


class ProposalChoice:
    """The record of the last WINDOW finished slices, (changes the model's proposal needed, changes fill's would
    have needed), and the source it picks: the model until fill has needed fewer changes over that window."""

    def __init__(self, window: int = WINDOW) -> None:
        self.record: deque[tuple[int, int]] = deque(maxlen=window)

    def learn(self, model: np.ndarray, fill: np.ndarray, final: np.ndarray) -> None:
        """A slice the user finished: `model` and `fill` (Y, X) as they were offered, `final` (Y, X) the user's."""
        self.record.append((int(np.count_nonzero(model != final)), int(np.count_nonzero(fill != final))))

    @property
    def source(self) -> Source:
        if not self.record:
            return "model"
        model, fill = np.sum(np.array(self.record), axis=0)
        return "fill" if fill < model else "model"

    def why(self) -> str:
        """The choice in words (the dock's status)."""
        if not self.record:
            return "the model's proposals (nothing finished yet to compare them with fill between slices)"
        model, fill = np.sum(np.array(self.record), axis=0)
        chosen = "fill between slices" if self.source == "fill" else "the model's proposals"
        return (f"{chosen}: on your last {len(self.record)} finished slice(s) the model's needed {model} changed "
                f"voxels, fill's {fill}")
