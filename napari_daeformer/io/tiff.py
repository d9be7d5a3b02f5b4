"""TIFF (tifffile): single images and multi-page stacks, with resolution and ImageJ spacing where present."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import tifffile

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import ImageFormatError, first_line
from napari_daeformer.base.memory import check_allocation
from napari_daeformer.io.record import LABELS_MARK, ImageRecord, check_pixels, default_affine

_MM_PER_UNIT = {1: 1.0, 2: 25.4, 3: 10.0}          # TIFF ResolutionUnit: none (pixels), inch, centimetre
_IMAGEJ_UNITS = {"mm": 1.0, "micron": 1e-3, "um": 1e-3, "\\u00B5m": 1e-3, "µm": 1e-3, "cm": 10.0, "nm": 1e-6}


# What tifffile and its codecs raise on a damaged file (imagecodecs' errors are RuntimeErrors): each is the file's
# fault. Our own errors (a refused allocation) pass through as they are.
TIFF_ERRORS = (tifffile.TiffFileError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, RuntimeError,
               struct.error, zlib.error)

def read_tiff(path: Path) -> ImageRecord:
    """Read a TIFF into (Y, X), (Y, X, 3) or (Z, Y, X); spacing from X/YResolution and ImageJ metadata."""
    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            check_allocation(path.name, 2 * math.prod(series.shape) * series.dtype.itemsize,
                             f"reading {'x'.join(map(str, series.shape))} {series.dtype} pixels", ImageFormatError)
            data = tif.asarray()
            page = tif.pages.first
            colour = page.photometric == tifffile.PHOTOMETRIC.RGB and page.samplesperpixel in (3, 4)
            spacing_yx, unitless = _resolution_mm(page)
            ij = tif.imagej_metadata or {}
            shaped = (tif.shaped_metadata or ({},))[0] or {}
    except TIFF_ERRORS as e:
        raise ImageFormatError(f"{path.name}: not a readable TIFF ({first_line(e)})") from e
    data = np.squeeze(data)
    # RGB by the photometric tag (8- or 16-bit); untagged 8-bit (Y, X, 3|4) arrays are photos too.
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and (colour or data.dtype == np.uint8)
    notes: tuple[str, ...] = ()
    if rgb and data.shape[-1] == 4:
        data, notes = data[..., :3], ("alpha channel dropped",)
    spatial_ndim = data.ndim - 1 if rgb else data.ndim
    if spatial_ndim not in (2, 3):
        raise ImageFormatError(f"{path.name}: TIFF of shape {data.shape} is not a 2D image, RGB photo or 3D stack")
    check_pixels(data, path.name)
    unit = _IMAGEJ_UNITS.get(str(ij.get("unit", "mm")), 1.0)
    if ij and unitless:                                   # ImageJ: pixels per `unit`, not per inch/cm
        spacing_yx = (spacing_yx[0] * unit, spacing_yx[1] * unit)
    spacing: tuple[float, ...] = spacing_yx
    if spatial_ndim == 3:
        spacing = (_number(ij.get("spacing", 1.0)) * unit, *spacing_yx)
    if not all(math.isfinite(v) and v > 0 for v in spacing):          # -3, 0, NaN, inf: no size to measure by
        notes = (*notes, f"spacing {tuple(float(v) for v in spacing)} is not positive and finite: read as 1 per "
                         "voxel; volumes are in voxels of that size, not mm")
        spacing = tuple(v if math.isfinite(v) and v > 0 else 1.0 for v in spacing)
    key, value = LABELS_MARK
    is_labels = not rgb and value in (ij.get(key), shaped.get(key))
    return ImageRecord(data=np.ascontiguousarray(data), spacing=spacing, affine=default_affine(spacing),
                       dtype=str(data.dtype), path=path, modality="rgb" if rgb else "gray", source_format="tiff",
                       notes=notes, is_labels=is_labels)


def _number(value: object) -> float:
    """A metadata value as a float; NaN when it is none (`spacing=abc`), which the caller notes and reads as 1."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _resolution_mm(page: tifffile.TiffPage) -> tuple[tuple[float, float], bool]:
    """(Y, X) pixel size in mm from the resolution tags, and whether the tags had no unit."""
    tags = page.tags
    unit = int(getattr(tags.get("ResolutionUnit"), "value", 2))
    mm = _MM_PER_UNIT.get(unit, 1.0)

    def spacing(tag: str) -> float:
        value = getattr(tags.get(tag), "value", None)
        if not value:
            return 1.0
        num, den = value if isinstance(value, tuple) else (value, 1)
        return mm * den / num if num else 1.0

    if "XResolution" not in tags:
        return (1.0, 1.0), True
    return (spacing("YResolution"), spacing("XResolution")), unit == 1


def write_tiff(path: Path, data: np.ndarray, spacing: tuple[float, ...], *, overwrite: bool = False) -> Path:
    """Write labels as TIFF (zlib): resolution in pixels per centimetre, Z spacing as ImageJ metadata."""
    y, x = spacing[-2:]
    mark = dict([LABELS_MARK])                                    # read back as a label map
    kwargs: dict[str, object] = {"resolution": (10.0 / x, 10.0 / y), "resolutionunit": "CENTIMETER",
                                 "compression": "zlib", "metadata": mark}
    if data.ndim == 3:
        kwargs.update(imagej=True, metadata={"spacing": spacing[0], "unit": "mm", "axes": "ZYX", **mark})
        kwargs.pop("compression")
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["resolutionunit"] = "NONE"

    def write(tmp: Path) -> None:
        tifffile.imwrite(str(tmp), data, **kwargs)  # type: ignore[arg-type]

    return atomic_write(path, write, overwrite=overwrite)
