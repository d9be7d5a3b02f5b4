"""napari's own open/save through the plugin: scale from spacing, the source affine restored on save."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from skimage import io as skio

from napari_daeformer.io import METADATA_KEY, read_image

from ..conftest import write_dicom_series
from ..io.test_nifti_tiff_photo import oblique_affine

pytestmark = pytest.mark.gui


def _files(tmp: Path) -> dict[str, tuple[float, ...]]:
    """file -> expected layer scale."""
    nib.save(nib.Nifti1Image(np.full((24, 20, 6), -900, np.int16), oblique_affine()), str(tmp / "ct.nii.gz"))
    tifffile.imwrite(str(tmp / "stack.tif"), np.zeros((4, 10, 12), np.uint16), imagej=True,
                     resolution=(1 / 0.5, 1 / 0.25), metadata={"spacing": 3.0, "unit": "mm", "axes": "ZYX"})
    skio.imsave(str(tmp / "photo.png"), np.full((12, 14, 3), 128, np.uint8), check_contrast=False)
    write_dicom_series(tmp / "dicom", np.zeros((3, 8, 10), np.uint16), (2.0, 0.9, 0.8))
    spacing = tuple(np.linalg.norm(oblique_affine()[:3, :3], axis=0)[::-1])
    return {"ct.nii.gz": spacing, "stack.tif": (3.0, 0.25, 0.5), "photo.png": (1.0, 1.0), "dicom": (2.0, 0.9, 0.8)}


def test_open_each_format_with_spacing_as_scale(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    for name, scale in _files(tmp_path).items():
        layers = viewer.open(str(tmp_path / name), plugin="napari-daeformer")
        assert len(layers) == 1, name
        np.testing.assert_allclose(layers[0].scale, scale, rtol=1e-5, err_msg=name)
        assert METADATA_KEY in layers[0].metadata
    assert viewer.layers["photo"].rgb


def test_labels_layer_saved_with_source_affine(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _files(tmp_path)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "ct.nii.gz"), plugin="napari-daeformer")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[2:4, 5:9, 3:11] = 2
    layer = viewer.add_labels(labels, name="mask", scale=image.scale, translate=image.translate,
                              metadata=dict(image.metadata))
    out = tmp_path / "mask.nii.gz"
    layer.save(str(out), plugin="napari-daeformer")
    saved = read_image(out)
    assert np.array_equal(saved.affine, read_image(tmp_path / "ct.nii.gz").affine)
    assert np.array_equal(saved.data, labels)


def test_sample_data_menu_entries(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    viewer.open_sample("napari-daeformer", "synthetic_ct")
    ct = viewer.layers["synthetic CT"]
    assert ct.data.shape == (48, 192, 192) and tuple(ct.scale) == (3.0, 0.8, 0.8)
    viewer.open_sample("napari-daeformer", "synthetic_skin")
    assert viewer.layers["synthetic skin"].rgb


def test_unreadable_file_is_reported_not_crashing(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="broken.nii.gz"):   # napari wraps our ImageFormatError in ReaderPluginError
        viewer.open(str(tmp_path / "broken.nii.gz"), plugin="napari-daeformer")
    assert len(viewer.layers) == 0
