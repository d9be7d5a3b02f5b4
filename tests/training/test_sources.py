"""Data sources in the layouts users have: Synapse, nnU-Net/MSD, *_image/*_label, ISIC; bad pairs reported."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from napari_daeformer_training.sources import load_cases
from skimage import io as skio

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.io import write_labels
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.orientation import radiological_affine
from napari_daeformer.io.sample_data import synthetic_ct, synthetic_skin
from napari_daeformer.model.checkpoint import SYNAPSE_CLASSES

from .helpers import ct_case


def write_synapse(root: Path, cases: dict[str, int], test: dict[str, int]) -> None:
    """TransUNet's layout from phantoms: windowed to [0, 1] like the real preprocessed data."""
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir(parents=True)
    for name, seed in cases.items():
        case = ct_case(seed, slices=6, side=32)
        image = np.clip((case.image.astype(np.float32) + 125) / 400, 0, 1)
        for z in range(len(image)):
            np.savez(root / "train_npz" / f"{name}_slice{z:03d}.npz", image=image[z], label=case.labels[z])
    for name, seed in test.items():
        case = ct_case(seed, slices=6, side=32)
        with h5py.File(root / "test_vol_h5" / f"{name}.npy.h5", "w") as f:
            f["image"] = np.clip((case.image.astype(np.float32) + 125) / 400, 0, 1)
            f["label"] = case.labels


def test_synapse_layout(tmp_path: Path) -> None:
    write_synapse(tmp_path, {"case0005": 1, "case0006": 2}, {"case0001": 3})
    train = load_cases(tmp_path)
    assert [c.name for c in train] == ["case0005", "case0006"] and train[0].image.shape == (6, 32, 32)
    original = ct_case(1, slices=6, side=32).image
    np.testing.assert_allclose(np.clip(train[0].image, -125, 275), np.clip(original, -125, 275), atol=0.05)
    test = load_cases(tmp_path, split="test")
    assert [c.name for c in test] == ["case0001"]


def test_synapse_label_mapping_is_pinned() -> None:
    assert SYNAPSE_CLASSES == ("background", "aorta", "gallbladder", "left kidney", "right kidney", "liver",
                               "pancreas", "spleen", "stomach")


def test_nnunet_and_pair_layouts(tmp_path: Path) -> None:
    s = synthetic_ct(seed=4, shape=(5, 32, 40))
    affine = radiological_affine(s.spacing)
    for layout in ("nnunet", "pairs"):
        root = tmp_path / layout
        if layout == "nnunet":
            write_nifti(root / "imagesTr" / "liver_007_0000.nii.gz", s.image, affine)
            write_labels(root / "labelsTr" / "liver_007.nii.gz", s.labels, {"affine": affine.tolist(),
                         "spacing": list(s.spacing), "spatial_shape": list(s.labels.shape)})
        else:
            write_nifti(root / "p1_image.nii.gz", s.image, affine)
            write_labels(root / "p1_label.nii.gz", s.labels, {"affine": affine.tolist(), "spacing": list(s.spacing),
                                                               "spatial_shape": list(s.labels.shape)})
        (case,) = load_cases(root)
        assert case.name == ("liver_007" if layout == "nnunet" else "p1")
        assert np.array_equal(case.labels, s.labels) and case.spacing == pytest.approx(s.spacing)


def test_isic_layout(tmp_path: Path) -> None:
    for i in range(2):
        s = synthetic_skin(seed=i, size=(48, 64))
        skio.imsave(str(tmp_path / f"ISIC_000000{i}.jpg"), s.image, check_contrast=False)
        skio.imsave(str(tmp_path / f"ISIC_000000{i}_segmentation.png"), s.labels * 255, check_contrast=False)
    cases = load_cases(tmp_path)
    assert len(cases) == 2 and cases[0].image.shape == (48, 64, 3) and set(np.unique(cases[0].labels)) == {0, 1}


def test_bad_pairs_are_listed_before_training(tmp_path: Path) -> None:
    s = synthetic_ct(seed=4, shape=(5, 32, 40))
    affine = radiological_affine(s.spacing)
    geometry = {"affine": affine.tolist(), "spacing": list(s.spacing), "spatial_shape": [5, 32, 40]}
    write_nifti(tmp_path / "imagesTr" / "a.nii.gz", s.image, affine)                     # no label
    write_nifti(tmp_path / "imagesTr" / "b.nii.gz", s.image, affine)
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "b.nii.gz").write_bytes(b"broken")                          # unreadable
    write_nifti(tmp_path / "imagesTr" / "c.nii.gz", s.image, affine)
    write_labels(tmp_path / "labelsTr" / "c.nii.gz", s.labels, geometry)                  # fine
    with pytest.raises(TrainingError) as info:
        load_cases(tmp_path)
    message = str(info.value)
    assert message.startswith("2 bad pair(s)") and "a: no label file" in message and "b.nii.gz" in message
