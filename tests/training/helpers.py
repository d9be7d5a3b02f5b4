"""Small synthetic training data for the trainer tests."""

from __future__ import annotations

from napari_daeformer_training.data import Case

from napari_daeformer.io.sample_data import CT_CLASSES, synthetic_ct
from napari_daeformer.model import DAEFormerConfig
from napari_daeformer.model.checkpoint import ModelCard
from napari_daeformer.model.preprocessing import ct_preprocessing

SMALL_CT = DAEFormerConfig(num_classes=6, in_channels=1, embed_dims=(32, 64, 128), depths=(1, 1, 1),
                           decoder_depths=(1, 1))


def ct_case(seed: int, slices: int = 24, side: int = 96) -> Case:
    s = synthetic_ct(seed=seed, shape=(slices, side, side), spacing=(3.0, 153.6 / side, 153.6 / side))
    return Case(f"ct-{seed}", s.image, s.labels, s.spacing)


def ct_card(size: int = 96) -> ModelCard:
    return ModelCard(SMALL_CT, CT_CLASSES, input_size=(size, size), preprocessing=ct_preprocessing())
