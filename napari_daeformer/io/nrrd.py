"""NRRD (.nrrd, .nhdr) volumes and 3D Slicer segmentations (.seg.nrrd) with pynrrd: geometry kept, arrays in
(Z, Y, X) order.

NRRD places voxels with `space directions` (one vector per axis) and a `space origin` in its `space` (3D Slicer
writes left-posterior-superior); our affines are NIfTI's RAS+, so LPS is flipped on its first two axes. A
`.seg.nrrd` carries each segment's name, colour and label value as `SegmentN_*` fields, which Slicer reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..errors import ImageFormatError, first_line
from ..memory import check_allocation
from .record import ImageRecord, check_affine, check_pixels

NRRD_SUFFIXES = (".nrrd", ".nhdr")
SEG_NRRD_SUFFIX = ".seg.nrrd"
_TO_RAS = {"right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1), "left-posterior-superior": (-1, -1, 1),
           "lps": (-1, -1, 1), "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


@dataclass(frozen=True)
class Segmentation:
    """A label map read from a .seg.nrrd: the record (labels as data) and a name and colour per label value."""

    record: ImageRecord
    class_names: tuple[str, ...]       # index = label value; values without a segment are "label N"
    class_colors: tuple[str, ...]      # "#rrggbb"


def is_seg_nrrd(path: str | Path) -> bool:
    return str(path).lower().endswith(SEG_NRRD_SUFFIX)


def _import_nrrd() -> Any:
    try:
        import nrrd
    except ImportError as e:
        raise ImageFormatError("reading NRRD needs pynrrd: pip install pynrrd") from e
    return nrrd


def _affine(header: dict[str, Any], ndim: int, name: str) -> np.ndarray:
    """The RAS+ affine of (x, y[, z]) indices from `space directions` and `space origin` (or `spacings`)."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        vectors = [np.asarray(d, dtype=np.float64) for d in directions if d is not None]
        rows = [v for v in vectors if not np.isnan(v).all()]                  # a list axis has none
        if len(rows) != ndim:
            raise ImageFormatError(f"{name}: {len(rows)} space directions for {ndim} spatial axes")
        dims = len(rows[0])
        for i, row in enumerate(rows):
            affine[:dims, i] = row
        origin = np.asarray(header.get("space origin", np.zeros(dims)), dtype=np.float64)
        affine[:dims, 3] = origin
        space = str(header.get("space", "right-anterior-superior")).lower()
        if dims == 3:
            if space not in _TO_RAS:
                raise ImageFormatError(f"{name}: NRRD space {space!r} is not one of {', '.join(sorted(_TO_RAS)[::2])}")
            affine = np.diag([*_TO_RAS[space], 1.0]) @ affine
    else:
        spacings = header.get("spacings")
        for i in range(ndim):
            s = float(spacings[i]) if spacings is not None and np.isfinite(spacings[i]) else 1.0
            affine[i, i] = s
    return check_affine(affine, name)


def _read(path: Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """(data ([Z,] Y, X), header, affine) of a scalar 2D or 3D NRRD."""
    nrrd = _import_nrrd()
    try:
        header = nrrd.read_header(str(path))
    except Exception as e:  # pynrrd raises NRRDError, ValueError, KeyError, UnicodeDecodeError on bad headers
        raise ImageFormatError(f"{path.name}: not a readable NRRD file ({first_line(e)})") from e
    sizes = [int(s) for s in header.get("sizes", [])]
    kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * len(sizes))]
    spatial = [s for s, k in zip(sizes, kinds) if k in ("domain", "space")]
    if len(spatial) not in (2, 3) or len(spatial) != len(sizes):
        layers = " (a segmentation with overlapping segments: export it from Slicer as a labelmap)" if \
            len(sizes) == 4 else ""
        raise ImageFormatError(f"{path.name}: NRRD of sizes {sizes} is not a scalar 2D image or 3D volume{layers}")
    itemsize = np.dtype(_dtype(header.get("type", "uint8"), path.name)).itemsize
    check_allocation(path.name, math.prod(spatial) * itemsize * 2, f"reading {'x'.join(map(str, spatial))} voxels",
                     ImageFormatError)
    try:
        data, header = nrrd.read(str(path), index_order="C")      # C order: (z, y, x), the array order used here
    except Exception as e:  # truncated or corrupt data: zlib, EOF, ValueError
        raise ImageFormatError(f"{path.name}: NRRD data is truncated or corrupt ({first_line(e)})") from e
    data = np.ascontiguousarray(data)
    check_pixels(data, path.name)
    return data, header, _affine(header, data.ndim, path.name)


def _dtype(kind: str, name: str) -> str:
    aliases = {"signed char": "int8", "uchar": "uint8", "unsigned char": "uint8", "short": "int16", "ushort": "uint16",
               "unsigned short": "uint16", "int": "int32", "uint": "uint32", "unsigned int": "uint32",
               "longlong": "int64", "ulonglong": "uint64", "float": "float32", "double": "float64"}
    kind = str(kind).lower().replace("_t", "")
    try:
        return np.dtype(aliases.get(kind, kind)).name
    except TypeError as e:
        raise ImageFormatError(f"{name}: NRRD type {kind!r} is not a number type") from e


def _spacing(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """mm per array axis ((Z, Y, X) order) from the affine's column lengths."""
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(ndim))[::-1]


def read_nrrd(path: Path) -> ImageRecord:
    """A 2D or 3D scalar NRRD; a .seg.nrrd opens as labels (`read_seg_nrrd` also gives its segment names)."""
    if is_seg_nrrd(path):
        return read_seg_nrrd(path).record
    data, header, affine = _read(path)
    modality = "ct" if data.size and float(data.min()) < -500 else "gray"
    return ImageRecord(data=data, spacing=_spacing(affine, data.ndim), affine=affine, dtype=str(data.dtype),
                       path=path, modality=modality, source_format="nrrd")


def read_seg_nrrd(path: Path) -> Segmentation:
    """A 3D Slicer segmentation (one layer: segments that do not overlap) with its segment names and colours."""
    data, header, affine = _read(path)
    if not np.issubdtype(data.dtype, np.integer):
        raise ImageFormatError(f"{path.name}: a segmentation holds integer labels, got {data.dtype}")
    segments: dict[int, tuple[str, str]] = {}
    for i in range(10_000):
        key = f"Segment{i}_"
        if key + "Name" not in header and key + "LabelValue" not in header:
            break
        layer = int(header.get(key + "Layer", 0))
        if layer != 0:
            raise ImageFormatError(f"{path.name}: segment {i} lies on layer {layer} (overlapping segments); export it "
                                   "from Slicer as a labelmap")
        value = int(header.get(key + "LabelValue", i + 1))
        rgb = [float(c) for c in str(header.get(key + "Color", "0.5 0.5 0.5")).split()[:3]]
        colour = "#" + "".join(f"{round(255 * min(max(c, 0.0), 1.0)):02x}" for c in rgb)
        segments[value] = (str(header.get(key + "Name", f"label {value}")), colour)
    top = max([int(data.max(initial=0)), *segments])
    names = tuple("background" if v == 0 else segments.get(v, (f"label {v}", ""))[0] for v in range(top + 1))
    colours = tuple("#000000" if v == 0 else segments.get(v, ("", "#808080"))[1] for v in range(top + 1))
    record = ImageRecord(data=data, spacing=_spacing(affine, data.ndim), affine=affine, dtype=str(data.dtype),
                         path=path, source_format="nrrd", is_labels=True)
    return Segmentation(record, names, colours)


def write_seg_nrrd(path: Path, labels: np.ndarray, affine: np.ndarray, class_names: tuple[str, ...],
                   class_colors: tuple[str, ...], *, overwrite: bool = False) -> Path:
    """Write a (Z, Y, X) label map as a .seg.nrrd 3D Slicer opens as a segmentation named by `class_names`
    (index = label value; background not a segment), atomically, in LPS as Slicer writes it."""
    nrrd = _import_nrrd()
    affine = check_affine(affine, path.name)
    if labels.ndim != 3:
        raise ImageFormatError(f"{path.name}: a .seg.nrrd holds a volume; got shape {labels.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    values = [int(v) for v in np.unique(labels) if v != 0]
    header: dict[str, Any] = {
        "type": "uint8" if labels.max(initial=0) <= 255 else "uint16", "dimension": 3,
        "space": "left-posterior-superior", "kinds": ["domain"] * 3, "encoding": "gzip",
        "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    extent = " ".join(f"0 {n - 1}" for n in labels.shape[::-1])
    for i, v in enumerate(range(1, max(len(class_names), max(values, default=0) + 1))):
        name = class_names[v] if v < len(class_names) else f"label {v}"
        colour = class_colors[v] if v < len(class_colors) else "#808080"
        rgb = " ".join(f"{int(colour[k:k + 2], 16) / 255:.6g}" for k in (1, 3, 5))
        header.update({f"Segment{i}_ID": f"Segment_{v}", f"Segment{i}_Name": name, f"Segment{i}_LabelValue": str(v),
                       f"Segment{i}_Layer": "0", f"Segment{i}_Color": rgb, f"Segment{i}_Extent": extent,
                       f"Segment{i}_NameAutoGenerated": "0", f"Segment{i}_ColorAutoGenerated": "0",
                       f"Segment{i}_Tags": "Segmentation.Status:inprogress|"})
    data = labels.astype(header["type"], copy=False)
    return atomic_write(path, lambda tmp: nrrd.write(str(tmp), data, header, index_order="C"), overwrite=overwrite)
