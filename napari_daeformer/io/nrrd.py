"""NRRD (.nrrd, .nhdr) volumes and 3D Slicer segmentations (.seg.nrrd) with pynrrd: geometry kept, arrays in
(Z, Y, X) order.

NRRD places voxels with `space directions` (one vector per axis) and a `space origin` in its `space` (3D Slicer
writes left-posterior-superior); our affines are NIfTI's RAS+, so LPS is flipped on its first two axes. A
`.seg.nrrd` carries each segment's name, colour and label value as `SegmentN_*` fields, which Slicer reads back.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import ImageFormatError, first_line, printable
from napari_daeformer.base.memory import check_allocation, format_bytes
from napari_daeformer.io.record import ImageRecord, check_affine, check_pixels, looks_like_labels

NRRD_SUFFIXES = (".nrrd", ".nhdr")
SEG_NRRD_SUFFIX = ".seg.nrrd"
_TO_RAS = {"right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1), "left-posterior-superior": (-1, -1, 1),
           "lps": (-1, -1, 1), "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}
MAX_LABEL = 65535                         # the largest label value the writers keep (uint16)
_MAX_NAME = 200                           # characters of a segment name
_MAX_SKIPPED_LINE = 1 << 16               # bytes of one skipped line
_MAX_TEXT_BYTES_PER_BYTE = 32             # ascii encoding: characters per byte of voxel data at most


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


def _affine(header: dict[str, Any], ndim: int, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """The RAS+ affine of (x, y[, z]) indices from `space directions` and `space origin` (or `spacings`), and a
    note when spacings that are no sizes (NaN, 0, negative, missing) were read as 1."""
    affine, notes = np.eye(4), ()
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
        given = [float(v) for v in np.atleast_1d(np.asarray(header.get("spacings", []), dtype=np.float64))]
        spacings = [v if i < len(given) and math.isfinite(v) and v > 0 else 1.0
                    for i, v in enumerate(given[:ndim] + [math.nan] * (ndim - len(given)))]
        if "spacings" in header and spacings != given[:ndim]:
            notes = (f"spacings {' '.join(f'{v:g}' for v in given)} are not {ndim} positive sizes: read as 1 per "
                     "voxel; volumes are in voxels of that size, not mm",)
        for i, v in enumerate(spacings):
            affine[i, i] = v
        if ndim == 3:                         # no orientation given: a volume stored as it is shown (io.orientation)
            affine[:2, :2] *= -1
    return check_affine(affine, name), notes


def _read(path: Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray, tuple[str, ...]]:
    """(data ([Z,] Y, X), header, affine, notes) of a scalar 2D or 3D NRRD."""
    nrrd = _import_nrrd()
    with open(path, "rb") as fh:
        try:
            header = nrrd.read_header(fh)
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
        check_allocation(path.name, math.prod(spatial) * itemsize * 2,
                         f"reading {'x'.join(map(str, spatial))} voxels", ImageFormatError)
        payload = _payload(path, fh, header, math.prod(spatial) * itemsize)
    raw = {**header, "encoding": "raw", "line skip": 0, "byte skip": 0}
    if _is_text(header):                                  # parsed to this machine's byte order
        raw["endian"] = sys.byteorder
    for key in ("data file", "datafile", "lineskip", "byteskip"):
        raw.pop(key, None)
    try:
        data = nrrd.read_data(raw, io.BytesIO(payload), index_order="C")  # C order: (z, y, x), the order used here
    except Exception as e:  # too few bytes, a type pynrrd refuses: NRRDError, ValueError
        raise ImageFormatError(f"{path.name}: NRRD data is truncated or corrupt ({first_line(e)})") from e
    data = np.ascontiguousarray(data)
    check_pixels(data, path.name)
    return data, header, *_affine(header, data.ndim, path.name)


def _payload(path: Path, fh: BinaryIO, header: dict[str, Any], nbytes: int) -> bytes:
    """The `nbytes` of raw voxel data the header declares, decompressed, from the attached data or a detached file
    in the header's own folder; never more than the declared size is read or inflated (a gzip bomb stops there)."""
    name = header.get("data file", header.get("datafile"))
    if name is not None:
        fh = _data_file(path, str(name))
    try:
        line_skip = int(header.get("line skip", header.get("lineskip", 0)))
        byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
        if line_skip < 0 or byte_skip < -1:
            raise ImageFormatError(f"{path.name}: NRRD line skip {line_skip} / byte skip {byte_skip} is negative")
        for _ in range(line_skip):
            if not fh.readline(_MAX_SKIPPED_LINE):
                break
        encoding = str(header.get("encoding", "raw")).lower()
        if encoding in ("gzip", "gz", "bzip2", "bz2"):
            data = _inflate(path, fh, encoding, nbytes + max(byte_skip, 0))
            return data[-nbytes:] if byte_skip == -1 else data[byte_skip:]
        if encoding == "raw":
            if byte_skip == -1:
                fh.seek(-nbytes, os.SEEK_END)
            else:
                fh.seek(byte_skip, os.SEEK_CUR)
            return fh.read(nbytes)
        if _is_text(header):
            text = fh.read(nbytes * _MAX_TEXT_BYTES_PER_BYTE + 1)
            if len(text) > nbytes * _MAX_TEXT_BYTES_PER_BYTE:
                raise ImageFormatError(f"{path.name}: the NRRD text data is longer than its declared size allows")
            values = np.array(text.split(), dtype=np.float64)
            return values.astype(_dtype(header.get("type", "uint8"), path.name)).tobytes()
        raise ImageFormatError(f"{path.name}: NRRD encoding {encoding!r} is not raw, gzip, bzip2 or ascii")
    except (OSError, ValueError) as e:
        raise ImageFormatError(f"{path.name}: NRRD data is truncated or corrupt ({first_line(e)})") from e
    finally:
        if name is not None:
            fh.close()


def _is_text(header: dict[str, Any]) -> bool:
    return str(header.get("encoding", "raw")).lower() in ("ascii", "text", "txt")


def _data_file(path: Path, name: str) -> BinaryIO:
    """The detached data file `name` of the header at `path`: a plain file in the header's own folder (a header may
    not read a file elsewhere on the machine: '/etc/passwd', '../secret' or a link out are refused)."""
    if not name or Path(name).name != name or name in (".", "..") or name.upper() == "LIST" or "%" in name:
        raise ImageFormatError(f"{path.name}: its data file {printable(name)!r} is not a file beside the header; "
                               "a detached NRRD's data must lie in the header's folder")
    target = path.parent / name
    if target.is_symlink() or not target.is_file():
        raise ImageFormatError(f"{path.name}: its data file {printable(name)!r} is missing or not a plain file "
                               "beside the header")
    return open(target, "rb")


def _inflate(path: Path, fh: BinaryIO, encoding: str, limit: int) -> bytes:
    """Decompress the rest of `fh` (gzip or bzip2, streamed), refusing once more than `limit` bytes come out."""
    try:
        with (gzip.GzipFile(fileobj=fh) if encoding.startswith("gz") else bz2.BZ2File(fh)) as stream:
            out = stream.read(limit + 1)                  # never more than one byte past the declared size
    except (zlib.error, OSError, EOFError) as e:
        raise ImageFormatError(f"{path.name}: NRRD data is truncated or corrupt ({first_line(e)})") from e
    if len(out) > limit:
        raise ImageFormatError(f"{path.name}: the compressed data inflates beyond the {format_bytes(limit)} its header "
                               "declares (a damaged or malicious file); it was not read")
    return out


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
    data, header, affine, notes = _read(path)
    modality = "ct" if data.size and float(data.min()) < -500 else "gray"
    return ImageRecord(data=data, spacing=_spacing(affine, data.ndim), affine=affine, dtype=str(data.dtype),
                       path=path, modality=modality, source_format="nrrd", notes=notes,
                       is_labels=looks_like_labels(data))


def read_seg_nrrd(path: Path) -> Segmentation:
    """A 3D Slicer segmentation (one layer: segments that do not overlap) with its segment names and colours."""
    data, header, affine, notes = _read(path)
    if not np.issubdtype(data.dtype, np.integer):
        raise ImageFormatError(f"{path.name}: a segmentation holds integer labels, got {data.dtype}")
    top = int(data.max(initial=0))
    if top > MAX_LABEL or int(data.min(initial=0)) < 0:
        raise ImageFormatError(f"{path.name}: label values must lie in 0..{MAX_LABEL}, got "
                               f"{int(data.min(initial=0))}..{top}")
    segments: dict[int, tuple[str, str]] = {}
    for i in range(10_000):
        key = f"Segment{i}_"
        if key + "Name" not in header and key + "LabelValue" not in header:
            break
        if _field_int(header, key + "Layer", 0, path.name) != 0:
            raise ImageFormatError(f"{path.name}: segment {i} lies on layer {header[key + 'Layer']} (overlapping "
                                   "segments); export it from Slicer as a labelmap")
        value = _field_int(header, key + "LabelValue", i + 1, path.name)
        if not 1 <= value <= MAX_LABEL:
            raise ImageFormatError(f"{path.name}: {key}LabelValue {value} is not a label value (1..{MAX_LABEL})")
        segments[value] = (printable(str(header.get(key + "Name", f"label {value}")))[:_MAX_NAME],
                           _field_colour(header, key + "Color", path.name))
    top = max([top, *segments])
    names = tuple("background" if v == 0 else segments.get(v, (f"label {v}", ""))[0] for v in range(top + 1))
    colours = tuple("#000000" if v == 0 else segments.get(v, ("", "#808080"))[1] for v in range(top + 1))
    record = ImageRecord(data=data, spacing=_spacing(affine, data.ndim), affine=affine, dtype=str(data.dtype),
                         path=path, source_format="nrrd", is_labels=True, notes=notes)
    return Segmentation(record, names, colours)


def _field_int(header: dict[str, Any], key: str, default: int, name: str) -> int:
    text = str(header.get(key, default)).strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,9}", text):
        raise ImageFormatError(f"{name}: {key} {printable(text)[:40]!r} is not a whole number")
    return int(text)


def _field_colour(header: dict[str, Any], key: str, name: str) -> str:
    """"#rrggbb" from Slicer's "r g b" in 0..1 (grey when absent)."""
    text = str(header.get(key, "0.5 0.5 0.5"))
    try:
        rgb = [float(c) for c in text.split()[:3]]
    except ValueError:
        rgb = []
    if len(rgb) != 3 or not all(math.isfinite(c) for c in rgb):
        raise ImageFormatError(f"{name}: {key} {printable(text)[:40]!r} is not three numbers from 0 to 1")
    return "#" + "".join(f"{round(255 * min(max(c, 0.0), 1.0)):02x}" for c in rgb)


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
