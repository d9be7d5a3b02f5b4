"""Per-class volumes (mL) or areas (mm²) of a label map, from its spacing; pixel counts for photos."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def is_physical(source_format: str, spacing: Sequence[float]) -> bool:
    """Whether the spacing is in millimetres: photos (PNG/JPEG/BMP) and bare layers of unit scale are in pixels."""
    return source_format not in ("photo", "layer") or any(float(s) != 1.0 for s in spacing)


@dataclass(frozen=True)
class Measures:
    """Class name -> volume in mL (3D) or area in mm² (2D), or voxel/pixel counts where the spacing is not in
    millimetres; background left out. What the CLI prints, batch's summary holds and the Segment dock shows."""

    values: dict[str, float]
    unit: str

    @classmethod
    def of(cls, labels: np.ndarray, spacing: Sequence[float], source_format: str, class_names: Sequence[str]
           ) -> Measures:
        """The measures of ([Z,] Y, X) `labels` of an image read from `source_format` with `spacing` (mm)."""
        physical = is_physical(source_format, spacing)
        counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=len(class_names))
        unit = float(np.prod(spacing)) / (1000.0 if labels.ndim == 3 else 1.0) if physical else 1.0   # mm³ -> mL
        values = {name: float(counts[i]) * unit for i, name in enumerate(class_names) if i > 0}
        if physical:
            return cls(values, "mL" if labels.ndim == 3 else "mm²")
        return cls(values, "voxels" if labels.ndim == 3 else "pixels")

    @property
    def digits(self) -> int:
        """Decimals worth showing: counts are whole numbers."""
        return 0 if self.unit in ("voxels", "pixels") else 1

    def text(self, name: str) -> str:
        """'166.5 mL', '420 pixels'."""
        return f"{self.values[name]:.{self.digits}f} {self.unit}"
