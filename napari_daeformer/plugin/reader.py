"""napari reader contribution: a thin layer over `napari_daeformer.io.read_image`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_daeformer.base.errors import ImageFormatError, printable
from napari_daeformer.io import METADATA_KEY, ImageRecord, can_read, read_image
from napari_daeformer.io.dicom_seg import find_series, is_dicom_seg, read_dicom_seg
from napari_daeformer.io.nrrd import is_seg_nrrd, read_seg_nrrd
from napari_daeformer.io.orientation import AXIS_LABELS, STORED_KEY, describe, display_translate, for_display
from napari_daeformer.io.record import CHECKPOINT_KEY, CLASSES_KEY, COLORS_KEY
from napari_daeformer.model.preprocessing import CT_WINDOWS

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: our reader for NIfTI, DICOM, TIFF and photos, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return read_layers if paths and all(can_read(p) for p in paths) else None


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Read each path into an image layer with scale/translate from spacing/origin and geometry in metadata.

    A file that cannot be read becomes an error notification (its one-line reason) and no layer; the others
    still open. Nothing read at all: napari's "no layers" sentinel, so napari adds nothing and asks nothing.
    """
    from napari.utils.notifications import show_error

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers = []
    for p in paths:
        try:
            layers.append(seg_to_layer(p) if is_dicom_seg(p) else seg_nrrd_to_layer(p) if is_seg_nrrd(p)
                          else record_to_layer(read_image(p)))
        except ImageFormatError as e:
            show_error(f"napari-daeformer: {printable(str(e))}")
    return layers or [(None,)]  # type: ignore[list-item]


def _placed(record: ImageRecord) -> tuple[ImageRecord, dict[str, Any]]:
    """A volume turned to the radiological display (`io.orientation`), and the layer's geometry keywords: scale,
    translate, metadata (with the source's storage, for the writer) and axis labels naming the sides."""
    shown, stored = for_display(record)
    geometry = shown.geometry()
    kwargs: dict[str, Any] = {"scale": list(shown.spacing), "translate": list(shown.origin)}
    if len(shown.spatial_shape) == 3 and not shown.rgb:
        kwargs["translate"], kwargs["axis_labels"] = display_translate(shown), AXIS_LABELS
        geometry["orientation"] = f"stored {describe(record.affine)}, shown radiological (LPS)"
        if stored is not None:
            geometry[STORED_KEY] = stored.as_json()
    kwargs["metadata"] = {METADATA_KEY: geometry}
    return shown, kwargs


def record_to_layer(record: ImageRecord, name: str | None = None) -> LayerData:
    """An ImageRecord as napari layer data (a volume turned to the radiological display)."""
    record, placed = _placed(record)
    placed["metadata"]["notes"] = list(record.notes)
    kwargs: dict[str, Any] = {
        "name": name or (record.path.name.split(".")[0] if record.path else "image"),
        **placed,
        "rgb": record.rgb,
    }
    if record.is_labels:                                      # a label map we wrote: paintable, usable to train
        kwargs.pop("rgb")
        return (np.asarray(record.data).astype(np.uint16 if record.data.max(initial=0) > 255 else np.uint8,
                                                 copy=False), kwargs, "labels")
    if record.modality == "ct":
        kwargs["contrast_limits"] = list(CT_WINDOWS["soft tissue"])
        kwargs["colormap"] = "gray"
    return (record.data, kwargs, "image")


def _named_labels(record: ImageRecord, names: tuple[str, ...], colours: tuple[str, ...], name: str,
                  extra: dict[str, Any] | None = None) -> LayerData:
    """A label map with a name and colour per value as a labels layer (a volume turned as its image is)."""
    record, placed = _placed(record)
    placed["metadata"].update({CLASSES_KEY: list(names), COLORS_KEY: list(colours), **(extra or {})})
    kwargs: dict[str, Any] = {
        "name": name, **placed,
        "colormap": {None: "transparent", **dict(enumerate(colours)), 0: "transparent"},
    }
    return (np.asarray(record.data), kwargs, "labels")


def seg_nrrd_to_layer(path: str | os.PathLike[str]) -> LayerData:
    """A 3D Slicer .seg.nrrd as a labels layer named and coloured by its segments."""
    seg = read_seg_nrrd(Path(path))
    return _named_labels(seg.record, seg.class_names, seg.class_colors, os.path.basename(path).split(".")[0])


def seg_to_layer(path: str | os.PathLike[str]) -> LayerData:
    """A DICOM-SEG file as a labels layer on its series: the series' slices when it lies beside the file (its
    folder, a subfolder, or a sibling folder), else the extent of the segmented frames, placed by their positions."""
    from napari.utils.notifications import show_info

    series = find_series(path)
    seg = read_dicom_seg(path, series)
    if series is None:
        show_info(f"napari-daeformer: {os.path.basename(path)}: its source series is not beside it; the labels cover "
                  "the segmented slices only, placed by their positions")
    layer = _named_labels(replace(seg.record, data=seg.labels), seg.class_names, seg.class_colors,
                          os.path.basename(path).split(".")[0], {CHECKPOINT_KEY: seg.algorithm})
    layer[1]["metadata"][METADATA_KEY]["source_path"] = str(series) if series else None
    return layer
