"""Segmentation metrics on whole label maps: Dice and HD95 (in mm, from the voxel spacing).

Conventions (ours): a class absent from both prediction and ground truth scores NaN for both metrics and is
left out of means; present in exactly one of them, Dice 0 and HD95 NaN (no surface to measure to), counted
separately by the callers. `protocol="paper"` reproduces the official evaluation instead (medpy, as in
the released code's test script): an empty prediction scores (Dice 0, HD95 0) whatever the ground truth, a non-empty prediction with
an empty ground truth scores (1, 0), and HD95 is in voxels (spacing 1).

HD95 has two definitions in use, and each protocol follows the library it names (tests/test_metrics.py checks both
on random masks, anisotropic spacing included):
- ours: the larger of the two directed 95th percentiles of surface distances, MONAI's
  `compute_hausdorff_distance(percentile=95)`, in mm;
- paper: the 95th percentile of both directed distance sets pooled, medpy's `metric.binary.hd95`, which the
  official test script calls.
Surfaces are the voxels removed by one erosion with the face-connected structure, in both libraries and here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from napari_daeformer.base.errors import InvalidValue


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..num_classes-1 between two label maps of one shape; shape (num_classes - 1,)."""
    if pred.shape != truth.shape:
        raise InvalidValue(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    scores = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum()) + int(t.sum())
        if total:
            scores[c - 1] = 2.0 * np.logical_and(p, t).sum() / total
    return scores


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None, *, pooled: bool = False) -> float:
    """95th-percentile Hausdorff distance between two non-empty binary masks, in the units of `spacing`.

    Args:
        pooled: False: the larger of the two directed 95th percentiles (MONAI); True: the 95th percentile of
            both directions' distances together (medpy, the official evaluation).
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() or not truth.any():
        raise ValueError("HD95 needs two non-empty masks")
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=sampling)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[st]
    if pooled:
        return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def evaluate_case(pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None,
                  protocol: str = "ours") -> tuple[np.ndarray, np.ndarray]:
    """(Dice, HD95) per foreground class, each of shape (num_classes - 1,), under `protocol` (see module doc)."""
    if protocol not in ("ours", "paper"):
        raise InvalidValue(f"unknown protocol {protocol!r}; use ours or paper")
    dice = np.full(num_classes - 1, np.nan)
    dist = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        if protocol == "paper":
            if p.any() and t.any():
                dice[c - 1] = 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
                dist[c - 1] = hd95(p, t, None, pooled=True)
            elif p.any():
                dice[c - 1], dist[c - 1] = 1.0, 0.0
            else:
                dice[c - 1], dist[c - 1] = 0.0, 0.0
            continue
        if p.any() or t.any():
            dice[c - 1] = 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
        if p.any() and t.any():
            dist[c - 1] = hd95(p, t, spacing)
    return dice, dist
