"""Conversions between napari layers and the core's records (no widget code)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import corrections
from ..io import METADATA_KEY, ImageRecord, geometry_from_metadata
from ..io.record import CHECKPOINT_KEY, CHECKPOINT_SHA_KEY, CLASSES_KEY, COLORS_KEY, default_affine

if TYPE_CHECKING:
    import napari

PREDICTION_KEY = "daeformer_prediction"      # the model's own output, kept to find the user's corrections
TOUCHED_KEY = "daeformer_touched"            # slices (axis 0) the user painted, from the layer's paint events


def record_from_layer(layer: napari.layers.Image) -> ImageRecord:
    """The layer's data and geometry as an ImageRecord (geometry from the reader's metadata, else the scale)."""
    data = np.asarray(layer.data)
    geometry = geometry_from_metadata(layer.metadata)
    spatial_ndim = data.ndim - 1 if layer.rgb else data.ndim
    spacing = tuple(float(s) for s in layer.scale[-spatial_ndim:])
    affine = np.array(geometry["affine"]) if geometry else default_affine(spacing)
    modality = "rgb" if layer.rgb else (geometry or {}).get("modality", "gray")
    return ImageRecord(data=data, spacing=spacing, affine=affine, dtype=str(data.dtype), modality=modality,
                       source_format=(geometry or {}).get("source_format", "layer"))


def labels_kwargs(image: napari.layers.Image, class_names: tuple[str, ...], colors: tuple[str, ...],
                  prediction: np.ndarray, checkpoint_name: str, checkpoint_sha256: str = "") -> dict[str, Any]:
    """Keyword arguments of a Labels layer that sits exactly on `image` and carries its geometry, classes and the
    checkpoint that made it (what a DICOM-SEG export records)."""
    spatial_ndim = prediction.ndim
    metadata = {
        PREDICTION_KEY: prediction,
        CLASSES_KEY: list(class_names),
        COLORS_KEY: list(colors),
        CHECKPOINT_KEY: checkpoint_name,
        CHECKPOINT_SHA_KEY: checkpoint_sha256,
    }
    if METADATA_KEY in image.metadata:
        metadata[METADATA_KEY] = image.metadata[METADATA_KEY]
    return {
        "name": f"{image.name} DAE-Former",
        "scale": tuple(image.scale[-spatial_ndim:]),
        "translate": tuple(image.translate[-spatial_ndim:]),
        "metadata": metadata,
        "features": {"index": np.arange(len(class_names)), "class": list(class_names)},
        "colormap": {None: "transparent", 0: "transparent",
                     **{i: colors[i] for i in range(1, len(class_names))}},
    }


def track_edits(layer: napari.layers.Labels) -> None:
    """Follow the layer's paint events: every slice (axis 0) a paint, fill or erase touches is recorded."""
    if TOUCHED_KEY in layer.metadata:
        return
    layer.metadata[TOUCHED_KEY] = set()

    def on_paint(event: Any) -> None:
        if layer.data.ndim != 3:
            layer.metadata[TOUCHED_KEY].add(0)
            return
        for atom in event.value:
            layer.metadata[TOUCHED_KEY].update(corrections.touched_slices(atom, 0))

    layer.events.paint.connect(on_paint)


def edited_slices(layer: napari.layers.Labels) -> np.ndarray:
    """(S,) bool along axis 0: slices that differ from the model's prediction or that the user painted;
    for a layer painted from scratch (no prediction), the slices holding any label."""
    return corrections.edited_slices(np.asarray(layer.data), layer.metadata.get(PREDICTION_KEY),
                                     layer.metadata.get(TOUCHED_KEY, ()))
