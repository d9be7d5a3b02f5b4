"""napari sample-data contributions: the synthetic CT phantom and the synthetic skin photo."""

from __future__ import annotations

from typing import Any

from napari_daeformer.io import METADATA_KEY, ImageRecord
from napari_daeformer.io.orientation import drawn_affine
from napari_daeformer.io.sample_data import Sample, synthetic_ct, synthetic_skin
from napari_daeformer.model.checkpoint import DEFAULT_COLORS
from napari_daeformer.plugin.reader import record_to_layer

LayerData = tuple[Any, dict[str, Any], str]


def _layers(sample: Sample, name: str, modality: str) -> list[LayerData]:
    record = ImageRecord(sample.image, sample.spacing, drawn_affine(sample.spacing), str(sample.image.dtype),
                         modality=modality, source_format="photo" if modality == "rgb" else "synthetic")  # photos: pixels
    image = record_to_layer(record, name)
    colors = {i: DEFAULT_COLORS[i] for i in range(1, len(sample.class_names))}
    labels_kwargs = {"name": f"{name} ground truth", "scale": list(sample.spacing), "visible": False,
                     "metadata": {METADATA_KEY: record.geometry(), "class_names": list(sample.class_names)},
                     "colormap": {None: "transparent", **colors}}
    return [image, (sample.labels, labels_kwargs, "labels")]


def ct_sample() -> list[LayerData]:
    """Synthetic abdominal CT (48 x 192 x 192, 3 x 0.8 x 0.8 mm) with its organ labels (hidden)."""
    return _layers(synthetic_ct(seed=0), "synthetic CT", "ct")


def skin_sample() -> list[LayerData]:
    """Synthetic dermoscopy photo (256 x 256 RGB) with its lesion mask (hidden)."""
    return _layers(synthetic_skin(seed=0), "synthetic skin", "rgb")
