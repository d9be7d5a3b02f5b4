"""Augmentation moves image and labels together and keeps labels valid."""

from __future__ import annotations

import torch
from napari_daeformer_training.augment import AugmentConfig, augment_batch


def test_geometry_is_shared_and_labels_stay_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(6, 64, 64, dtype=torch.long)
    labels[:, 20:40, 10:30] = 2
    image = labels[:, None].float() * 0.5 - 0.5                       # the image is a picture of its labels
    only_geometry = AugmentConfig(p_flip=0.5, p_affine=1.0, p_warp=1.0, p_contrast=0, p_blur=0, p_noise=0)
    out_image, out_labels = augment_batch(image, labels, only_geometry, gen)
    assert set(out_labels.unique().tolist()) <= {0, 2}
    agree = ((out_image[:, 0] > -0.25) == (out_labels == 2)).float().mean()
    assert agree > 0.98                                              # same warp for both
    assert not torch.equal(out_labels, labels)


def test_noise_is_on_the_input_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.zeros(64, 1, 32, 32)
    noisy, _ = augment_batch(image, torch.zeros(64, 32, 32, dtype=torch.long),
                             AugmentConfig(p_flip=0, p_affine=0, p_warp=0, p_contrast=0, p_blur=0, p_noise=1.0), gen)
    assert 0.03 < noisy.std() < 0.07                                  # not the official 255-scale noise
