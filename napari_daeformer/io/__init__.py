"""Reading images and writing label maps with their geometry. Plain Python: no Qt, no napari.

`read_image(path)` returns an `ImageRecord` for NIfTI, NRRD, DICOM, TIFF and photos;
`write_labels(path, labels, geometry)` writes NIfTI/TIFF/PNG/.seg.nrrd atomically, restoring the source affine.
Every failure is an `ImageFormatError` with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_daeformer.base.errors import DaeformerError, ImageFormatError
from napari_daeformer.io.dicom import is_dicom_file, read_dicom
from napari_daeformer.io.nifti import read_nifti, write_nifti
from napari_daeformer.io.nrrd import NRRD_SUFFIXES, SEG_NRRD_SUFFIX, read_nrrd, write_seg_nrrd
from napari_daeformer.io.orientation import drawn_affine
from napari_daeformer.io.photo import PHOTO_SUFFIXES, read_photo, write_png
from napari_daeformer.io.record import METADATA_KEY, ImageRecord, check_affine, geometry_from_metadata
from napari_daeformer.io.tiff import read_tiff, write_tiff

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm",)
READ_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES + (SEG_NRRD_SUFFIX,) + TIFF_SUFFIXES + PHOTO_SUFFIXES + DICOM_SUFFIXES
LABEL_SUFFIXES = NIFTI_SUFFIXES + (SEG_NRRD_SUFFIX,) + TIFF_SUFFIXES + (".png",)

__all__ = ["ImageRecord", "METADATA_KEY", "READ_SUFFIXES", "LABEL_SUFFIXES", "read_image", "write_labels", "is_dicom_input",
           "check_label_path", "geometry_from_metadata", "suffix_of", "can_read"]


def suffix_of(path: str | os.PathLike[str]) -> str:
    """Lower-case suffix, with `.nii.gz` and `.seg.nrrd` as one suffix."""
    name = Path(path).name.lower()
    return next((s for s in (".nii.gz", SEG_NRRD_SUFFIX) if name.endswith(s)), Path(name).suffix)


def can_read(path: str | os.PathLike[str]) -> bool:
    """Whether `read_image` would try this path (by suffix, DICOM preamble or a folder holding DICOM)."""
    p = Path(path)
    try:
        if p.is_dir():
            return any(is_dicom_file(f) or f.suffix.lower() == ".dcm" for f in p.iterdir() if f.is_file())
        return suffix_of(p) in READ_SUFFIXES or (p.is_file() and is_dicom_file(p))
    except OSError:                                     # unreadable folder: not ours to claim
        return False


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """Whether `read_image` reads `path` as DICOM: a folder, a `.dcm` file, or a file of no known suffix that
    starts as DICOM does."""
    p = Path(path)
    suffix = suffix_of(p)
    return p.is_dir() or suffix in DICOM_SUFFIXES or (suffix not in READ_SUFFIXES and is_dicom_file(p))


def read_image(path: str | os.PathLike[str]) -> ImageRecord:
    """Read any supported image. Raises ImageFormatError only, whatever the bytes: each reader wraps the library
    calls that parse the file; an error in our own code is not caught here (it is a bug, not a bad file)."""
    p = Path(path)
    if not p.exists():
        raise ImageFormatError(f"{p}: no such file or folder")
    if not (p.is_file() or p.is_dir()):
        raise ImageFormatError(f"{p}: not a regular file (a device, pipe or socket); give an image file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise ImageFormatError(f"{p.name}: file is empty")
    record = _read(p)
    check_affine(record.affine, p.name)                  # every reader: voxels with a place and a size in space
    if record.data.dtype == bool:                        # 1-bit PNG, bool TIFF: numpy cannot subtract booleans
        record = replace(record, data=record.data.view(np.uint8))
    return record


def _read(p: Path) -> ImageRecord:
    suffix = suffix_of(p)
    try:
        if is_dicom_input(p):
            return read_dicom(p)
        if suffix in NIFTI_SUFFIXES:
            return read_nifti(p)
        if suffix in (*NRRD_SUFFIXES, SEG_NRRD_SUFFIX):
            return read_nrrd(p)
        if suffix in TIFF_SUFFIXES:
            return read_tiff(p)
        if suffix in PHOTO_SUFFIXES:
            return read_photo(p)
    except ImageFormatError:
        raise
    except DaeformerError as e:
        raise ImageFormatError(str(e)) from e
    except MemoryError as e:
        raise ImageFormatError(f"{p.name}: image too large for the available memory") from e
    raise ImageFormatError(f"{p.name}: unsupported file type {suffix or '(none)'}; "
                           f"supported: {', '.join(READ_SUFFIXES)} and DICOM folders")


def _check_label_format(p: Path, ndim: int | None, dicom_source: bool = False) -> None:
    """Refuse a label file format that would lose labels: JPEG (lossy), PNG for a volume, an unknown suffix, and
    DICOM-SEG (.dcm) for an image that is not a DICOM series."""
    suffix = suffix_of(p)
    if suffix in DICOM_SUFFIXES:
        if not dicom_source:
            raise ImageFormatError(f"{p.name}: a DICOM-SEG (.dcm) output references a DICOM series; this image is "
                                   "not one, so use .nii.gz or .tif")
        return
    if suffix in (".jpg", ".jpeg"):
        raise ImageFormatError(f"{p.name}: JPEG is lossy and would corrupt label values; save masks as PNG")
    if suffix not in LABEL_SUFFIXES:
        raise ImageFormatError(f"{p.name}: cannot write labels as {suffix or '(no suffix)'}; "
                               f"use one of {', '.join(LABEL_SUFFIXES)}")
    if suffix == ".png" and ndim == 3:
        raise ImageFormatError(f"{p.name}: PNG holds one 2D slice, got a volume; use .nii.gz or .tif for volumes")
    if suffix == SEG_NRRD_SUFFIX and ndim == 2:
        raise ImageFormatError(f"{p.name}: a .seg.nrrd holds a volume, got a 2D image; use .png or .tif")


def check_label_path(path: str | os.PathLike[str], ndim: int | None = None, *, overwrite: bool = False,
                     source: str | os.PathLike[str] | None = None, dicom_source: bool = False) -> None:
    """Refuse, before any work, a label path `write_labels` would refuse: its format (JPEG is lossy; PNG holds one
    2D slice), an existing file without `overwrite`, a folder that cannot be written, and (even with `overwrite`)
    the image the labels are made from.

    Args:
        ndim: 2 or 3 when known (a volume cannot go to PNG).
        source: the input image's path, when known.
        dicom_source: the image is a DICOM series, so a `.dcm` path (a DICOM-SEG) is allowed.
    """
    from napari_daeformer.base.atomic import check_output_path
    if source is not None and Path(path).exists() and Path(path).resolve() == Path(source).resolve():
        raise ImageFormatError(f"{path} is the input image; write the labels to another file")
    _check_label_format(Path(path), ndim, dicom_source)
    check_output_path(path, overwrite)


def write_labels(path: str | os.PathLike[str], labels: np.ndarray, geometry: dict[str, Any] | ImageRecord | None = None,
                 *, overwrite: bool = False, class_names: tuple[str, ...] = (), class_colors: tuple[str, ...] = ()
                 ) -> Path:
    """Write an integer label map beside its source's geometry.

    Args:
        path: .nii/.nii.gz (affine restored), .seg.nrrd (affine, and the segments named by `class_names` /
            `class_colors` for 3D Slicer; volumes only), .tif/.tiff (spacing), or .png (2D only).
        labels: ([Z,] Y, X) integer array in the source's array order.
        geometry: an ImageRecord, its `geometry()` dict (e.g. from layer metadata), or None (unit spacing; a volume
            stored as shown, `io.orientation.drawn_affine`).
        overwrite: replace an existing file; otherwise refuse.
    """
    p = Path(path)
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ImageFormatError(f"{p.name}: labels must be integers, got {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ImageFormatError(f"{p.name}: labels must be 2D or 3D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ImageFormatError(f"{p.name}: label values must lie in 0..65535, got {labels.min()}..{labels.max()}")
    out = labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16, copy=False)
    if isinstance(geometry, ImageRecord):
        geometry = geometry.geometry()
    spacing = tuple(geometry["spacing"]) if geometry else (1.0,) * labels.ndim
    affine = np.array(geometry["affine"], dtype=np.float64) if geometry else drawn_affine(spacing)
    if geometry and tuple(geometry.get("spatial_shape", labels.shape)) != labels.shape:
        raise ImageFormatError(f"{p.name}: labels of shape {labels.shape} do not match the source image's "
                               f"{tuple(geometry['spatial_shape'])}")
    _check_label_format(p, labels.ndim)
    suffix = suffix_of(p)
    if suffix in NIFTI_SUFFIXES:
        return write_nifti(p, out, affine, overwrite=overwrite, labels=True)
    if suffix == SEG_NRRD_SUFFIX:
        return write_seg_nrrd(p, out, affine, class_names, class_colors, overwrite=overwrite)
    if suffix in TIFF_SUFFIXES:
        return write_tiff(p, out, spacing, overwrite=overwrite)
    return write_png(p, out, overwrite=overwrite)
