"""Volumes shown the way a radiologist reads them, whatever their storage, and written back in that storage.

napari draws array axes as they are: axis 0 on the slider, axis 1 down the screen, axis 2 across it. A volume is
turned (voxels flipped and transposed, never resampled) so that its columns run to the patient's left, its rows to
the posterior and its slices to the superior side: an axial slice shows the patient's right on the screen's left
and anterior at the top (the radiological convention of PACS viewers, 3D Slicer and ITK-SNAP). An oblique volume
is turned to its nearest axes. The storage it came in travels with the layer (`StoredAs`), so labels painted on it
are written back voxel for voxel in the source's own order with the source's own affine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from napari_daeformer.io.record import ImageRecord, affine_spacing, default_affine

DISPLAY = ("L", "P", "S")       # NIfTI voxel axes (i: columns, j: rows, k: slices) point to these patient sides
AXIS_LABELS = ("I→S", "A→P", "R→L")   # array axes (slices, rows, columns) as shown: from one side to the other
STORED_KEY = "stored_as"        # geometry key: the source's storage, where the display differs from it
ORIENTED = ("nifti", "nrrd", "dicom")    # formats that say where the patient is (a TIFF stack is shown as stored)


@dataclass(frozen=True)
class StoredAs:
    """How the source stored the volume: its affine and the axis flips/permutation from the displayed array."""

    affine: np.ndarray            # the source's 4x4 voxel-to-RAS matrix, bit for bit
    ornt: np.ndarray              # (3, 2) nibabel orientation taking the displayed (i, j, k) axes to the source's

    def as_json(self) -> dict[str, Any]:
        return {"affine": self.affine.tolist(), "ornt": self.ornt.tolist()}

    @staticmethod
    def from_json(value: dict[str, Any]) -> StoredAs:
        return StoredAs(np.array(value["affine"], np.float64), np.array(value["ornt"], np.float64))


def _turn(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """(Z, Y, X) `data` with nibabel orientation `ornt` applied to its (i, j, k) = (X, Y, Z) axes."""
    return np.ascontiguousarray(apply_orientation(data.transpose(2, 1, 0), ornt).transpose(2, 1, 0))


def for_display(record: ImageRecord) -> tuple[ImageRecord, StoredAs | None]:
    """`record` turned to the display orientation (a volume of an ORIENTED format only), with how the source stored
    it (None: already stored so, or nothing to turn)."""
    if len(record.spatial_shape) != 3 or record.rgb or record.source_format not in ORIENTED:
        return record, None
    to_display = ornt_transform(io_orientation(record.affine), axcodes2ornt(DISPLAY))
    if _identity(to_display):
        return record, None
    shape_ijk = record.data.shape[::-1]
    affine = record.affine @ inv_ornt_aff(to_display, shape_ijk)
    turned = replace(record, data=_turn(record.data, to_display), affine=affine,
                     spacing=affine_spacing(affine, 3))
    back = ornt_transform(axcodes2ornt(DISPLAY), io_orientation(record.affine))
    return turned, StoredAs(np.array(record.affine, np.float64), back)


def _identity(ornt: np.ndarray) -> bool:
    return bool(np.array_equal(ornt[:, 0], np.arange(3)) and (ornt[:, 1] == 1).all())


def radiological(record: ImageRecord) -> ImageRecord:
    """`record` as the viewer shows it (`for_display`): what models are trained on and segment."""
    return for_display(record)[0]


def to_storage(labels: np.ndarray, stored: StoredAs) -> tuple[np.ndarray, np.ndarray]:
    """Displayed (Z, Y, X) `labels` in the source's own voxel order, with the source's affine."""
    return _turn(np.asarray(labels), stored.ornt), stored.affine


def display_translate(record: ImageRecord) -> list[float]:
    """The layer's translate for a displayed volume: the first voxel's position as (S, P, L) millimetres, so that
    the coordinates napari shows grow along the axes as drawn (DICOM's patient coordinates, z first)."""
    r, a, s = (float(v) for v in record.affine[:3, 3])
    return [s, -a, -r]


def radiological_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine of a (Z, Y, X) volume drawn as a radiologist reads it (the phantoms: the liver on the image's
    left, the spine at the bottom): columns to the patient's left, rows to the posterior, slices to the superior."""
    return np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])


def drawn_affine(spacing: tuple[float, ...], translate: tuple[float, ...] | None = None) -> np.ndarray:
    """The affine of an array with no source geometry, as napari draws it: a volume radiologically
    (`radiological_affine`, its `translate` read as (S, P, L) mm, `display_translate`'s inverse), a 2D image
    axis-aligned (`translate` per array axis)."""
    translate = tuple(translate) if translate is not None else (0.0,) * len(spacing)
    if len(spacing) == 3:
        affine = radiological_affine((spacing[0], spacing[1], spacing[2]))
        affine[:3, 3] = (-translate[2], -translate[1], translate[0])
        return affine
    affine = default_affine(spacing)
    affine[:len(spacing), 3] = translate[::-1]
    return affine


def describe(affine: np.ndarray) -> str:
    """'RAS' for an affine whose voxel axes i, j, k point right, anterior, superior (nearest axes)."""
    return "".join(aff2axcodes(affine))
