"""Conversions between napari layers and the core's records (no widget code)."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_daeformer.io import METADATA_KEY, ImageRecord, geometry_from_metadata
from napari_daeformer.io.record import CHECKPOINT_KEY, CHECKPOINT_SHA_KEY, CLASSES_KEY, COLORS_KEY, default_affine
from napari_daeformer.plugin.hub import hub_for
from napari_daeformer.session.annotation import Annotation, ImageIdentity

if TYPE_CHECKING:
    import napari

_MUTED: set[Hashable] = set()                      # labels layers whose paint events are the engine's, not the user's


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
                  spatial_ndim: int, checkpoint_name: str, checkpoint_sha256: str = "") -> dict[str, Any]:
    """Keyword arguments of a Labels layer that sits exactly on `image` and carries its geometry, classes and the
    checkpoint that made it (what a DICOM-SEG export records)."""
    metadata = {
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


def image_identity(image: napari.layers.Image, key: str) -> ImageIdentity:
    """The image's identity for annotations (`key`: `annotation.image_key` of its pixels)."""
    source = (geometry_from_metadata(image.metadata) or {}).get("source_path") or (
        str(image.source.path) if image.source.path else "")
    return ImageIdentity(key, image.name, str(source or ""))


def painting_axis(viewer: napari.Viewer, layer: napari.layers.Labels) -> int:
    """The layer axis the user is slicing along now (the first axis not displayed; 0 in a 3D view)."""
    offset = viewer.dims.ndim - layer.ndim
    axes = [a - offset for a in viewer.dims.not_displayed if a - offset >= 0]
    return axes[0] if layer.ndim == 3 and axes else 0


def attach(viewer: napari.Viewer, layer: napari.layers.Labels, annotation: Annotation) -> Annotation:
    """Register `annotation` as `layer`'s in the viewer's hub and follow the layer's paint events: every slice a
    paint, fill or erase touches is recorded along the axis the user was viewing."""
    hub = hub_for(viewer)
    followed = hub.annotation(layer.unique_id) is not None
    hub.annotate(layer.unique_id, annotation)
    if followed:
        return annotation

    def on_paint(event: Any) -> None:
        current = hub.annotation(layer.unique_id)
        if current is None or layer.unique_id in _MUTED:
            return
        axis = painting_axis(viewer, layer)
        for atom in event.value:
            current.paint(atom, axis, layer.data.ndim)

    layer.events.paint.connect(on_paint)
    from napari_daeformer.plugin.widgets.fill import bind_fill_key

    bind_fill_key(viewer, layer)
    return annotation


def annotation_of(viewer: napari.Viewer, layer: napari.layers.Labels) -> Annotation | None:
    return hub_for(viewer).annotation(layer.unique_id)


def follow(viewer: napari.Viewer, layer: napari.layers.Labels) -> Annotation:
    """`layer`'s annotation; a labels layer the plugin did not make (painted from scratch, opened from a file)
    gets one with no proposal, so its painted slices are followed too."""
    return annotation_of(viewer, layer) or attach(viewer, layer, Annotation(image=ImageIdentity("", ""), layer_name=layer.name))


@contextmanager
def engine_writes(layer: napari.layers.Labels) -> Iterator[None]:
    """Paint events fired inside are the engine's own writes, not the user's corrections."""
    _MUTED.add(layer.unique_id)
    try:
        yield
    finally:
        _MUTED.discard(layer.unique_id)


def corrected_slices(viewer: napari.Viewer, layer: napari.layers.Labels, axis: int = 0) -> np.ndarray:
    """(S,) bool along `axis`: the slices of `layer` the user corrected (`Annotation.corrected`)."""
    return follow(viewer, layer).corrected(np.asarray(layer.data), axis)


def proposals_first(viewer: napari.Viewer) -> list[napari.layers.Labels]:
    """The viewer's labels layers, those holding a model's proposal first (newest first), then the others (ground
    truth, labels painted from scratch): what a labels picker offers, its first entry the default."""
    from napari.layers import Labels

    layers = [x for x in viewer.layers if isinstance(x, Labels)]
    proposed = [x for x in reversed(layers) if (a := annotation_of(viewer, x)) is not None and a.prediction is not None]
    return proposed + [x for x in layers if x not in proposed]
