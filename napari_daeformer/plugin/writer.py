"""napari writer contribution for Labels layers: restores the source image's geometry from layer metadata."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_daeformer import __version__
from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import geometry_from_metadata, write_labels
from napari_daeformer.io.dicom_seg import Algorithm, write_dicom_seg
from napari_daeformer.io.orientation import STORED_KEY, StoredAs, drawn_affine, to_storage
from napari_daeformer.io.record import CHECKPOINT_KEY, CHECKPOINT_SHA_KEY, CLASSES_KEY, COLORS_KEY, affine_spacing


def write_labels_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: NIfTI (source affine), .seg.nrrd (affine, segment names), TIFF (spacing) or PNG.

    napari's save dialog asks before replacing a file, so an existing file is overwritten here.
    """
    geometry = geometry_from_metadata(attributes.get("metadata"))
    data = np.asarray(data)
    if geometry is None:
        spacing = [float(s) for s in attributes.get("scale", [1.0] * np.ndim(data))]
        geometry = None if all(s == 1.0 for s in spacing) else _axis_aligned(spacing, attributes, np.shape(data))
    else:
        data, geometry = in_storage(data, geometry)
    metadata = attributes.get("metadata") or {}
    return [str(write_labels(path, data, geometry, overwrite=True,
                             class_names=tuple(metadata.get(CLASSES_KEY) or ()),
                             class_colors=tuple(metadata.get(COLORS_KEY) or ())))]


def in_storage(labels: np.ndarray, geometry: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Labels drawn on a volume the reader turned for display, back in the source's voxel order with its affine
    (`io.orientation`); others as they are."""
    if STORED_KEY not in geometry or labels.ndim != 3:
        return labels, geometry
    stored = StoredAs.from_json(geometry[STORED_KEY])
    labels, affine = to_storage(labels, stored)
    return labels, {**geometry, "affine": affine.tolist(), "spacing": list(affine_spacing(affine, 3)),
                    "spatial_shape": list(labels.shape)}


def _axis_aligned(spacing: list[float], attributes: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """Geometry of a layer without reader metadata: its scale and translate as napari draws it
    (`io.orientation.drawn_affine`), so that it opens again as it was drawn."""
    translate = tuple(float(t) for t in attributes.get("translate", [0.0] * len(spacing)))
    affine = drawn_affine(tuple(spacing), translate)
    return {"affine": affine.tolist(), "spacing": spacing, "spatial_shape": list(shape)}


def write_dicom_seg_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a labels layer made on a DICOM series as a DICOM-SEG referencing that series.

    napari's save dialog asks before replacing a file, so an existing file is overwritten here.
    """
    metadata = attributes.get("metadata") or {}
    geometry = geometry_from_metadata(metadata) or {}
    if geometry.get("source_format") != "dicom" or not geometry.get("source_path"):
        raise ImageFormatError(f"{attributes.get('name', 'this layer')}: a DICOM-SEG references a DICOM series; these "
                               "labels were not made on one (save them as .nii.gz or .tif)")
    labels, _ = in_storage(np.asarray(data), geometry)
    n = int(labels.max(initial=0)) + 1
    names = list(metadata.get(CLASSES_KEY) or [])
    names += [f"label {k}" for k in range(len(names), n)]
    colours = list(metadata.get(COLORS_KEY) or [])
    colours += ["#808080"] * (len(names) - len(colours))
    algorithm = Algorithm(str(metadata.get(CHECKPOINT_KEY) or "unknown"), str(metadata.get(CHECKPOINT_SHA_KEY) or ""),
                          __version__)
    return [str(write_dicom_seg(path, labels, geometry["source_path"], tuple(names), tuple(colours), algorithm,
                                overwrite=True))]
