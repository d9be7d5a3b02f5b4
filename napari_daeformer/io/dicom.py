"""DICOM series (a folder of slices, or one file) with pydicom: sorted by position, in HU, geometry kept."""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from napari_daeformer.base.errors import ImageFormatError, first_line
from napari_daeformer.base.memory import check_allocation
from napari_daeformer.io.record import ImageRecord, check_pixels

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the `dicom` extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImageFormatError(f"{purpose} needs {module}: pip install 'napari-daeformer[dicom]'") from e


def _pydicom() -> Any:
    return require("pydicom", "reading DICOM")


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: Path) -> ImageRecord:
    """Read one DICOM series from a folder (or a single file) into a (Z, Y, X) float32 HU volume.

    DICOM Segmentation objects in the folder (our own exports, say) are not part of the series and are skipped.

    Raises:
        ImageFormatError: no DICOM files, several series mixed, missing or irregular slices,
            slices of different size or orientation.
    """
    return _stack(*series_in_order(path, pixels=True), path)


def numbers(ds: Any, key: str, default: list[float], name: str) -> np.ndarray:
    """A numeric attribute (e.g. ImagePositionPatient) as float64 values, `default` where it is absent or empty;
    one ImageFormatError where the file holds something else (text, the wrong count, NaN)."""
    value = getattr(ds, key, None)
    value = default if value is None or value == "" else value
    try:
        out = np.atleast_1d(np.array(value, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise ImageFormatError(f"{name}: {key} {str(value)[:40]!r} is not numeric") from e
    if out.shape != (len(default),) or not np.isfinite(out).all():
        raise ImageFormatError(f"{name}: {key} {str(value)[:40]!r} is not {len(default)} finite number(s)")
    return out


def _pixels(ds: Any, name: str) -> np.ndarray:
    """The slice's stored values as pydicom decodes them: whatever a decoder raises for damaged or unsupported
    pixel data (its errors have no common base) is one ImageFormatError."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:
        raise ImageFormatError(f"{name}: DICOM pixel data cannot be decoded ({first_line(e)})") from e


def is_segmentation(ds: Any) -> bool:
    """Whether a dataset is a DICOM Segmentation (Modality SEG), not an image."""
    return str(getattr(ds, "Modality", "")).upper() == "SEG"


def _datasets(path: Path, pixels: bool) -> list[Any]:
    """The image datasets of one series: a folder's DICOM files (Segmentation objects left out) or one file."""
    pydicom = _pydicom()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    datasets = []
    for f in files:
        if path.is_dir() and not is_dicom_file(f) and f.suffix.lower() != ".dcm":
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=not pixels)
        except Exception as e:
            raise ImageFormatError(f"{f.name}: not a readable DICOM file ({first_line(e)})") from e
        if is_segmentation(ds):
            if not path.is_dir():
                raise ImageFormatError(f"{path.name}: is a DICOM Segmentation, not an image; open it as labels "
                                       "(napari) or read it with read_dicom_seg")
            continue
        datasets.append(ds)
    if not datasets:
        hint = (" (a folder of images is segmented with `daeformer batch`)"
                if path.is_dir() and any(f.is_file() or f.is_dir() for f in path.iterdir()) else "")
        raise ImageFormatError(f"{path.name}: no DICOM files found{hint}")
    series = Counter(str(getattr(ds, "SeriesInstanceUID", "?")) for ds in datasets)
    if len(series) > 1:
        listing = ", ".join(f"{uid[-12:]} ({n} files)" for uid, n in series.most_common())
        raise ImageFormatError(f"{path.name}: {len(series)} DICOM series are mixed in one folder ({listing}); "
                               "put each series in its own folder")
    return datasets


def series_in_order(path: Path, pixels: bool = False) -> tuple[list[Any], np.ndarray, float]:
    """The datasets of the series at `path` in the order of the volume's slices (ascending along the slice
    normal), their (Z, 3) ImagePositionPatient, and the slice spacing in mm. Without `pixels`, headers only.

    Raises:
        ImageFormatError: as `read_dicom`.
    """
    datasets = _datasets(path, pixels)
    first = datasets[0]
    iop = numbers(first, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0], path.name)
    row_dir, col_dir = orientation(first, path.name)
    normal = np.cross(row_dir, col_dir)
    for ds in datasets:
        if not np.allclose(numbers(ds, "ImageOrientationPatient", list(iop), path.name), iop, atol=1e-4):
            raise ImageFormatError(f"{path.name}: slices have different orientations; not one volume")
    positions = np.array([numbers(ds, "ImagePositionPatient", [0, 0, i], path.name) for i, ds in enumerate(datasets)])
    order = np.argsort(positions @ normal)
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    dist = positions @ normal
    if len(datasets) > 1:
        steps = np.diff(dist)
        if np.any(steps < 1e-3):
            raise ImageFormatError(f"{path.name}: two or more slices share one position (duplicates?)")
        step = float(np.median(steps))
        gaps = np.flatnonzero(np.abs(steps - step) > 0.1 * step)
        if gaps.size:
            raise ImageFormatError(f"{path.name}: slices are missing or irregularly spaced (spacing {step:.2f} mm, "
                                   f"but {steps[gaps[0]]:.2f} mm after slice {gaps[0]}); refusing to stack")
    else:
        step = float(numbers(first, "SliceThickness", [1.0], path.name)[0])
        step = step if step > 0 else 1.0                               # a thickness of -1 or 0 is no size
    return datasets, positions, step


def orientation(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The unit row and column directions (LPS) of a slice's ImageOrientationPatient: normalised (some writers
    store unscaled or rounded vectors, which would scale the volume), refused where they are zero or parallel."""
    iop = numbers(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0], name)
    row, col = iop[:3], iop[3:]
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if min(norms) < 1e-6 or np.linalg.norm(np.cross(row / norms[0], col / norms[1])) < 0.5:
        raise ImageFormatError(f"{name}: ImageOrientationPatient {list(iop)} gives no two independent directions "
                               "(damaged header)")
    return row / norms[0], col / norms[1]


def series_geometry(first: Any, positions: np.ndarray, step: float) -> tuple[tuple[float, float, float], np.ndarray]:
    """(Z, Y, X) spacing in mm and the RAS voxel-to-world affine of a series whose slices lie at `positions`
    (Z, 3), ascending, `first` being any of its datasets (orientation and pixel spacing)."""
    row_dir, col_dir = orientation(first, "DICOM series")
    row_spacing, col_spacing = (float(v) for v in numbers(first, "PixelSpacing", [1.0, 1.0], "DICOM series"))
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing                               # x index walks along a row
    lps[:3, 1] = col_dir * row_spacing                               # y index walks down the columns
    lps[:3, 2] = ((positions[-1] - positions[0]) / (len(positions) - 1) if len(positions) > 1
                  else np.cross(row_dir, col_dir) * step)
    lps[:3, 3] = positions[0]
    return (step, row_spacing, col_spacing), LPS_TO_RAS @ lps


def _stack(datasets: list[Any], positions: np.ndarray, step: float, path: Path) -> ImageRecord:
    first = datasets[0]
    rows, cols, frames = (max(1, int(numbers(first, k, [1], path.name)[0])) for k in ("Rows", "Columns", "NumberOfFrames"))
    check_allocation(path.name, len(datasets) * rows * cols * frames * (4 + 4 + 2),   # decoded, float32, stacked
                     f"decoding {len(datasets)} slice(s) of {rows}x{cols}", ImageFormatError)
    planes = [_pixels(ds, path.name) for ds in datasets]
    shapes = {plane.shape for plane in planes}
    if len(shapes) != 1:
        raise ImageFormatError(f"{path.name}: slices have different sizes {sorted(shapes)}")
    slices = []
    for ds, plane in zip(datasets, planes):
        slope = float(numbers(ds, "RescaleSlope", [1.0], path.name)[0]) or 1.0
        intercept = float(numbers(ds, "RescaleIntercept", [0.0], path.name)[0])
        slices.append(plane.astype(np.float32) * slope + intercept)
    volume = np.stack(slices)                                        # (Z, rows=Y, cols=X)
    check_pixels(volume, path.name)
    spacing, affine = series_geometry(first, positions, step)
    modality = "ct" if str(getattr(first, "Modality", "")).upper() == "CT" else "gray"
    return ImageRecord(data=volume, spacing=spacing, affine=affine, dtype=str(planes[0].dtype), path=path,
                       modality=modality, source_format="dicom")
