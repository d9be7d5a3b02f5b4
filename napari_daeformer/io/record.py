"""The image record every reader returns: pixels plus the geometry needed to write results back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_daeformer.base.errors import ImageFormatError

# Layer-metadata key under which geometry travels through napari (JSON-ready values only).
METADATA_KEY = "napari_daeformer"
# Labels-layer metadata that readers, writers and widgets share (JSON-ready values).
CLASSES_KEY = "class_names"
COLORS_KEY = "class_colors"                   # "#rrggbb" per class, background first
CHECKPOINT_KEY = "checkpoint"                 # file name of the checkpoint that made the labels
CHECKPOINT_SHA_KEY = "checkpoint_sha256"
LABELS_MARK = ("napari_daeformer", "labels")   # the key and value a written label map carries (TIFF, PNG)
MAX_CLASSES = 256                              # a model's label maps are uint8
MIN_VOXEL_MM, MAX_VOXEL_MM = 1e-6, 1e4         # 1 nm to 10 m: outside, a header is damaged


@dataclass(frozen=True)
class ImageRecord:
    """An image and its geometry.

    Args:
        data: (Z, Y, X) volume, (Y, X) greyscale image or (Y, X, 3) RGB photo.
        spacing: mm (or pixel units) per spatial array axis, in array order: (Z, Y, X) or (Y, X).
        affine: 4x4 voxel-to-world matrix in NIfTI convention: it maps (x, y, z) = the array index
            reversed (column, row, slice) to RAS+ millimetres. NIfTI's own affine is kept bit for bit.
        dtype: the on-disk dtype (the array may have been converted, e.g. DICOM to HU).
        path: where it was read from.
        modality: "ct", "mr", "rgb" or "gray": a hint for choosing preprocessing.
        source_format: "nifti", "nrrd", "dicom", "tiff" or "photo".
        notes: things the user should be told (e.g. an alpha channel was dropped).
        is_labels: the file is a label map this project wrote (it opens as a Labels layer).
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    dtype: str
    path: Path | None = None
    modality: str = "gray"
    source_format: str = "nifti"
    notes: tuple[str, ...] = field(default=())
    is_labels: bool = False

    @property
    def rgb(self) -> bool:
        return self.modality == "rgb"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.data.shape[:-1] if self.rgb else self.data.shape

    @property
    def origin(self) -> tuple[float, ...]:
        """World position (mm) of voxel 0, in array order: the affine's translation reversed."""
        return tuple(float(v) for v in self.affine[: len(self.spatial_shape), 3][::-1])

    def geometry(self) -> dict[str, Any]:
        """JSON-ready geometry, stored in napari layer metadata and restored by the writer."""
        return {
            "affine": self.affine.tolist(),
            "spacing": list(self.spacing),
            "spatial_shape": list(self.spatial_shape),
            "dtype": self.dtype,
            "source_path": str(self.path) if self.path else None,
            "modality": self.modality,
            "source_format": self.source_format,
        }


MAX_MAP_VALUES = 64                            # a label map from another tool holds at most this many values


def looks_like_labels(data: np.ndarray) -> bool:
    """Whether (Z, Y, X) or (Y, X) `data` is a label map another tool wrote without saying so (a `*_label.nii.gz`
    from Slicer or ITK-SNAP): whole numbers from 0 with at most MAX_MAP_VALUES distinct values. A scan's intensities
    span hundreds of values (checked on the range first: no full count for a CT)."""
    if data.ndim not in (2, 3) or not data.size or not np.issubdtype(data.dtype, np.integer):
        return False
    low, high = int(data.min()), int(data.max())
    if low != 0 or high == 0 or high >= MAX_CLASSES:
        return False
    return len(np.unique(data)) <= MAX_MAP_VALUES


def require_image(record: ImageRecord, name: str) -> ImageRecord:
    """`record`, refused (ImageFormatError) when it is a label map (a .seg.nrrd, a NIfTI of intent "label", a mask
    this project wrote, a map of a few whole numbers from another tool: `looks_like_labels`): segmenting or training
    on one as if it were a scan gives nonsense without a word."""
    if record.is_labels:
        raise ImageFormatError(f"{name}: is a label map (a segmentation), not an image; give the scan it was made on")
    return record


def is_rgb(image: np.ndarray, labels: np.ndarray | None = None) -> bool:
    """Whether an array (no record to say) is an RGB photo: (Y, X, 3), its labels (Y, X) where they are known. A
    reader decides from its format instead (`ImageRecord.rgb`)."""
    return image.ndim == 3 and image.shape[-1] == 3 and (labels is None or labels.ndim == 2)


LABEL_TOLERANCE = 1e-3                         # a float label this close to a whole number is that number


def label_channel(data: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """The one channel of a label file that holds the classes: the first of an RGB(A) mask, else the data."""
    return data[..., 0] if data.ndim == spatial_ndim + 1 and data.shape[-1] in (3, 4) else data


def label_values(data: np.ndarray, spatial_ndim: int, name: str) -> np.ndarray:
    """A label file's data as whole numbers ([Z,] Y, X), int64: the first channel of an RGB(A) mask; floats that
    resampling left near whole numbers (0.99999994) rounded, not truncated to the class below.

    Raises:
        ImageFormatError: a value that is no whole number (2.5), negative, NaN or infinite.
    """
    data = label_channel(data, spatial_ndim)
    if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
        values = data.astype(np.int64, copy=False)
    elif np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        off = ~np.isfinite(data) | (np.abs(data - rounded) > LABEL_TOLERANCE)
        if off.any():
            raise ImageFormatError(f"{name}: {int(off.sum())} label value(s) are not whole numbers (e.g. "
                                   f"{float(data[off].flat[0]):g}); a label map holds class numbers 0, 1, 2, ... "
                                   "(resample masks with nearest-neighbour interpolation)")
        values = rounded.astype(np.int64)
    else:
        raise ImageFormatError(f"{name}: labels must be numbers, got {data.dtype}")
    if values.size and values.min() < 0:
        raise ImageFormatError(f"{name}: label values must be 0 or more, got {int(values.min())}")
    return values


def default_affine(spacing: tuple[float, ...]) -> np.ndarray:
    """Axis-aligned affine for an image without world coordinates: diag(spacing reversed)."""
    affine = np.eye(4)
    for i, s in enumerate(spacing[::-1]):
        affine[i, i] = s
    return affine


def check_pixels(data: np.ndarray, name: str) -> None:
    """Refuse arrays no segmentation can use: too small, non-numeric, NaN or inf."""
    spatial = data.shape[:-1] if data.ndim == 3 and data.shape[-1] in (3, 4) and data.dtype == np.uint8 else data.shape
    if data.size == 0 or min(spatial[-2:], default=0) < 2:
        raise ImageFormatError(f"{name}: image of shape {data.shape} is too small (need at least 2x2 pixels)")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise ImageFormatError(f"{name}: pixel type {data.dtype} is not numeric")
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageFormatError(f"{name}: {bad} pixel(s) are NaN or infinite; fix or mask them before segmenting")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise ImageFormatError(f"{name}: complex-valued images are not supported")


def check_affine(affine: np.ndarray, name: str) -> np.ndarray:
    """`affine` as float64 if it can place voxels in space: finite, with three non-zero, independent axes."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ImageFormatError(f"{name}: the voxel-to-world affine holds NaN or infinite values (damaged header); "
                               "fix the file's sform/qform, e.g. with nibabel or fslorient")
    axes = np.linalg.norm(affine[:3, :3], axis=0)
    if not (axes > 0).all() or abs(np.linalg.det(affine[:3, :3])) <= 1e-9 * float(np.prod(axes)):
        raise ImageFormatError(f"{name}: the voxel-to-world affine is singular (a zero-length or repeated axis), so "
                               "voxels have no place in space; fix the file's sform/qform")
    if not ((axes >= MIN_VOXEL_MM) & (axes <= MAX_VOXEL_MM)).all():
        raise ImageFormatError(f"{name}: a voxel size of {' x '.join(f'{a:.3g}' for a in axes)} mm is no scan's "
                               f"(allowed {MIN_VOXEL_MM:g} to {MAX_VOXEL_MM:g} mm); fix the header's pixdim/sform")
    return affine


def affine_spacing(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """The voxel size (mm) along each of `ndim` array axes, in array order, as `affine` places them: the
    lengths of its first `ndim` columns, reversed."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :ndim], axis=0)[::-1])


def geometry_from_metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """The geometry dict a reader stored in layer metadata, if any."""
    if not metadata:
        return None
    geom = metadata.get(METADATA_KEY)
    return geom if isinstance(geom, dict) and "affine" in geom else None
