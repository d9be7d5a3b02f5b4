"""Per-class volumes (mL) or areas (mm^2) of a label map, from its spacing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_measures(labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str]) -> dict[str, float]:
    """Class name -> volume in millilitres for a 3D map, area in mm^2 for a 2D one (background left out)."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    unit = float(np.prod(spacing)) / (1000.0 if labels.ndim == 3 else 1.0)   # mm^3 -> mL
    return {name: float(counts[i]) * unit for i, name in enumerate(class_names) if i > 0}


def measure_unit(ndim: int) -> str:
    return "mL" if ndim == 3 else "mm²"
