"""DICOM Segmentation objects (what a PACS takes) with highdicom: label maps out, and back onto their series.

`write_dicom_seg` stores a (Z, Y, X) label map made on a DICOM series as a binary Segmentation with one segment per
class (label, colour, SNOMED code where the class name has one) and the algorithm that made it (DAE-Former, the
checkpoint's name and SHA-256); each frame references its source instance. `read_dicom_seg` reads one back as a
label map, in the order of its series' slices when the series is given, else in the order of the frames' positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import ImageFormatError, first_line
from napari_daeformer.io.dicom import LPS_TO_RAS, _pydicom, is_dicom_file, is_segmentation, require, series_geometry, series_in_order
from napari_daeformer.io.record import ImageRecord

SEG_SUFFIX = ".dcm"
ALGORITHM = "DAE-Former"


@dataclass(frozen=True)
class Algorithm:
    """Who made the labels: recorded in every segment's Algorithm Identification."""

    checkpoint: str                   # file name of the checkpoint
    sha256: str                       # of the checkpoint file ("" when unknown)
    software_version: str = ""


def _highdicom() -> Any:
    return require("highdicom", "DICOM-SEG")


def _property_type(name: str) -> Any:
    """The SNOMED CT concept of a class name ("left kidney" -> Kidney); a generic one when there is none."""
    from pydicom.sr.codedict import codes

    words = name.lower().replace("_", " ").split()
    for candidate in ("".join(w.title() for w in words), *(w.title() for w in reversed(words))):
        try:
            return getattr(codes.SCT, candidate)
        except AttributeError:
            continue
    return codes.SCT.Tissue


def _colour(hex_colour: str) -> Any:
    hd = _highdicom()
    rgb = [int(hex_colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)]              # 0..255
    return hd.color.CIELabColor.from_rgb(*rgb)


def is_dicom_seg(path: str | Path) -> bool:
    """Whether `path` is a DICOM file holding a Segmentation object."""
    p = Path(path)
    if not p.is_file() or not is_dicom_file(p):
        return False
    try:
        return is_segmentation(_pydicom().dcmread(str(p), stop_before_pixels=True, specific_tags=["Modality"]))
    except Exception:
        return False


def find_series(path: str | Path, max_folders: int = 200) -> Path | None:
    """The folder holding the series a DICOM-SEG file references, when it lies beside the file: the file's folder,
    one of its subfolders, or one of its parent's subfolders (at most `max_folders` looked at)."""
    pydicom = _pydicom()
    p = Path(path)
    try:
        ref = pydicom.dcmread(str(p), stop_before_pixels=True)
        uid = str(ref.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:
        return None
    candidates = [p.parent, *sorted(d for d in p.parent.iterdir() if d.is_dir()),
                  *sorted(d for d in p.parent.parent.iterdir() if d.is_dir() and d != p.parent)]
    for folder in candidates[:max_folders]:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f != p and is_dicom_file(f):
                try:
                    ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
                except Exception:
                    continue
                if not is_segmentation(ds):
                    if str(getattr(ds, "SeriesInstanceUID", "")) == uid:
                        return folder
                    break                                 # one image file tells the folder's series
    return None


def write_dicom_seg(path: str | Path, labels: np.ndarray, series: str | Path, class_names: tuple[str, ...],
                    class_colors: tuple[str, ...], algorithm: Algorithm, *, overwrite: bool = False) -> Path:
    """Write `labels` (Z, Y, X), made on the DICOM series at `series` (a folder or file), as a DICOM-SEG file.

    Classes 1..C-1 become segments 1..C-1 (background is no segment); empty frames are left out.

    Raises:
        ImageFormatError: the series cannot be read, the shapes differ, or highdicom refuses the data.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    p = Path(path)
    datasets, _, _ = series_in_order(Path(series))
    labels = np.asarray(labels)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.shape != (len(datasets), rows, cols):
        raise ImageFormatError(f"{p.name}: labels of shape {labels.shape} do not match the DICOM series "
                               f"({len(datasets)} slices of {rows}x{cols})")
    if labels.size and int(labels.max()) >= len(class_names):
        raise ImageFormatError(f"{p.name}: label value {int(labels.max())} has no class name "
                               f"(classes 0..{len(class_names) - 1})")
    identification = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM, family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.checkpoint + (f" sha256:{algorithm.sha256[:16]}" if algorithm.sha256 else ""),
        parameters={"checkpoint": algorithm.checkpoint, "checkpoint_sha256": algorithm.sha256 or "unknown"})
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=class_names[k], segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=_property_type(class_names[k]), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification, display_color=_colour(class_colors[k]))
        for k in range(1, len(class_names))]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=labels.astype(np.uint8 if len(class_names) <= 256 else np.uint16),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=hd.UID(), series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-daeformer",
            manufacturer_model_name=ALGORITHM, software_versions=algorithm.software_version or "unknown",
            device_serial_number="none", series_description=f"{ALGORITHM} {algorithm.checkpoint}"[:64])
    except AttributeError as e:
        raise ImageFormatError(f"{p.name}: the source series lacks an attribute a DICOM-SEG must copy ({first_line(e)})"
                               ) from e
    except (ValueError, TypeError) as e:
        raise ImageFormatError(f"{p.name}: highdicom refused the segmentation: {first_line(e)}") from e
    return atomic_write(p, lambda tmp: seg.save_as(str(tmp)), overwrite=overwrite)


@dataclass(frozen=True)
class DicomSeg:
    """A DICOM-SEG read back: (Z, Y, X) labels, their class names and colours, and the geometry of its frames."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    record: ImageRecord               # geometry (spacing, RAS affine) of the label volume; `data` is the labels
    algorithm: str                    # the Algorithm Identification's version text


def _frames(path: Path, series: str | Path | None, read: Callable[[], Any]) -> Any:
    """highdicom's frames of a Segmentation, whatever it raises for frames that do not fit (its errors have no
    common base) as one ImageFormatError."""
    try:
        return read()
    except Exception as e:
        raise ImageFormatError(f"{path.name}: its frames do not fit {'the series' if series else 'one volume'} "
                               f"({first_line(e)})") from e


def read_dicom_seg(path: str | Path, series: str | Path | None = None) -> DicomSeg:
    """Read a DICOM-SEG file into a label map (segment numbers as label values).

    With `series` (the source series), slice k of the result lies on slice k of `read_image(series)`; without it,
    the frames are stacked in the order of their positions along the slice normal.

    Raises:
        ImageFormatError: not a DICOM-SEG, or frames that do not fit the series.
    """
    hd = _highdicom()
    p = Path(path)
    try:
        seg = hd.seg.segread(str(p))
    except Exception as e:
        raise ImageFormatError(f"{p.name}: not a readable DICOM Segmentation ({first_line(e)})") from e
    numbers = sorted(int(d.SegmentNumber) for d in seg.SegmentSequence)
    names = ["background"] + [""] * max(numbers, default=0)
    colours = ["#000000"] + ["#ffffff"] * max(numbers, default=0)
    algorithm = ""
    for d in seg.SegmentSequence:
        names[int(d.SegmentNumber)] = str(d.SegmentLabel)
        if "RecommendedDisplayCIELabValue" in d:
            rgb = hd.color.CIELabColor.from_dicom_value(list(d.RecommendedDisplayCIELabValue)).to_rgb()
            colours[int(d.SegmentNumber)] = "#" + "".join(f"{int(round(v)):02x}" for v in rgb)
        for a in getattr(d, "SegmentationAlgorithmIdentificationSequence", []) or []:
            algorithm = str(getattr(a, "AlgorithmVersion", "")) or algorithm
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    if series is not None:
        datasets, positions, step = series_in_order(Path(series))
        labels = _frames(p, series, lambda: seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in datasets], combine_segments=True,
            assert_missing_frames_are_empty=True, dtype=dtype))
        spacing, affine = series_geometry(datasets[0], positions, step)
        record = ImageRecord(data=labels, spacing=spacing, affine=affine, dtype=str(labels.dtype), path=p,
                             source_format="dicom")
    else:
        volume = _frames(p, series, lambda: seg.get_volume(combine_segments=True, dtype=dtype))
        labels = np.asarray(volume.array)
        lps = np.array(volume.affine, dtype=np.float64)[:, [2, 1, 0, 3]]       # index (col, row, slice) -> LPS
        if lps[:3, 2] @ np.cross(lps[:3, 0], lps[:3, 1]) < 0:                  # slices ascending along the normal,
            labels = labels[::-1]                                             # as read_dicom stacks them
            lps[:3, 3] += (len(labels) - 1) * lps[:3, 2]
            lps[:3, 2] *= -1
        spacing = tuple(float(s) for s in np.linalg.norm(lps[:3, :3], axis=0)[::-1])
        record = ImageRecord(data=labels, spacing=spacing, affine=LPS_TO_RAS @ lps, dtype=str(labels.dtype), path=p,
                             source_format="dicom")
    return DicomSeg(labels, tuple(names), tuple(colours), record, algorithm)

