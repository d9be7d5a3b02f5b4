"""Per-class volumes (mL) or areas (mm²) of a label map, from its spacing; pixel counts for photos."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def is_physical(source_format: str, spacing: Sequence[float]) -> bool:
    """Whether the spacing is in millimetres: photos (PNG/JPEG/BMP) and bare layers of unit scale are in pixels."""
    return source_format not in ("photo", "layer") or any(float(s) != 1.0 for s in spacing)


def class_measures(labels: np.ndarray, spacing: Sequence[float], class_names: Sequence[str],
                   physical: bool = True) -> dict[str, float]:
    """Class name -> volume in mL (3D) or area in mm² (2D); pixel/voxel counts when not `physical`.
    Background is left out."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    unit = float(np.prod(spacing)) / (1000.0 if labels.ndim == 3 else 1.0) if physical else 1.0   # mm³ -> mL
    return {name: float(counts[i]) * unit for i, name in enumerate(class_names) if i > 0}


def measure_unit(ndim: int, physical: bool = True) -> str:
    if not physical:
        return "voxels" if ndim == 3 else "pixels"
    return "mL" if ndim == 3 else "mm²"
