"""Segmentation metrics on whole label maps.

Dice convention: a class absent from both prediction and ground truth scores NaN (not counted in the
mean); absent from exactly one, 0.
"""

from __future__ import annotations

import numpy as np


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..num_classes-1 between two label maps of one shape; shape (num_classes - 1,)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
    scores = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum()) + int(t.sum())
        if total:
            scores[c - 1] = 2.0 * np.logical_and(p, t).sum() / total
    return scores


def mean_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either map."""
    scores = dice_per_class(pred, truth, num_classes)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else 1.0
