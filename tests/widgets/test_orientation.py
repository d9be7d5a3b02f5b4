"""One scan stored RAS, LPS and oblique opens the same way in the viewer (radiological: the patient's right on the
screen's left, anterior at the top), with the sides named on the sliders; labels painted on it are saved in the
source's own voxel order with its own affine, bit for bit."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_daeformer.io import read_image
from napari_daeformer.io.orientation import AXIS_LABELS, radiological_affine
from napari_daeformer.io.sample_data import synthetic_ct

pytestmark = pytest.mark.gui


def _stored(tmp_path: Path) -> tuple[np.ndarray, dict[str, Path]]:
    """The phantom (drawn radiologically: LPS) written LPS, RAS (columns and rows flipped), and oblique (RAS turned
    12 degrees about the slice axis); the (Z, Y, X) array each file holds is the phantom's own."""
    s = synthetic_ct(seed=2, shape=(8, 48, 40))
    lps = radiological_affine(s.spacing)
    lps[:3, 3] = (12.0, -30.0, 50.0)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = lps.copy()
    ras[:3, :3] = lps[:3, :3] @ flip[:3, :3]
    ras[:3, 3] = (lps @ np.array([s.image.shape[2] - 1, s.image.shape[1] - 1, 0, 1.0]))[:3]   # the same place
    c, si = np.cos(np.radians(12)), np.sin(np.radians(12))
    oblique = ras.copy()
    oblique[:3, :3] = np.array([[c, -si, 0], [si, c, 0], [0, 0, 1]]) @ ras[:3, :3]
    arrays = {"lps": s.image, "ras": s.image[:, ::-1, ::-1], "oblique": s.image[:, ::-1, ::-1]}
    paths = {}
    for name, affine in (("lps", lps), ("ras", ras), ("oblique", oblique)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arrays[name].transpose(2, 1, 0)), affine), str(paths[name]))
    return s.image, paths


def test_one_scan_shows_the_same_whatever_its_storage(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, paths = _stored(tmp_path)
    viewer = make_napari_viewer()
    shown = {name: viewer.open(str(path), plugin="napari-daeformer")[0] for name, path in paths.items()}
    for name, layer in shown.items():
        assert np.array_equal(np.asarray(layer.data), image), name           # the liver on the screen's left
        assert tuple(layer.axis_labels) == AXIS_LABELS, name
        assert "shown radiological" in layer.metadata["napari_daeformer"]["orientation"]
    np.testing.assert_allclose(shown["ras"].translate, shown["lps"].translate, atol=1e-4)
    np.testing.assert_allclose(shown["ras"].scale, shown["lps"].scale, rtol=1e-6)
    assert viewer.dims.axis_labels == AXIS_LABELS


@pytest.mark.parametrize("stored", ["ras", "oblique", "lps"])
def test_labels_painted_on_it_are_saved_in_the_source_storage(make_napari_viewer, tmp_path: Path, stored: str) -> None:  # type: ignore[no-untyped-def]
    _, paths = _stored(tmp_path)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(paths[stored]), plugin="napari-daeformer")
    painted = np.zeros(layer.data.shape, np.uint8)
    painted[3, 5:20, 4:12] = 1                                          # top left of the screen
    labels = viewer.add_labels(painted, name="mask", scale=layer.scale, translate=layer.translate,
                               metadata=dict(layer.metadata))
    out = tmp_path / f"{stored}-mask.nii.gz"
    labels.save(str(out), plugin="napari-daeformer")
    saved, source = nib.load(str(out)), nib.load(str(paths[stored]))
    assert np.array_equal(saved.affine, source.affine)                  # the source's own affine, bit for bit
    expected = painted if stored == "lps" else painted[:, ::-1, ::-1]   # the source's voxel order
    assert np.array_equal(np.asarray(saved.dataobj).transpose(2, 1, 0), expected)
    (again,) = viewer.open(str(out), plugin="napari-daeformer")         # and it opens where it was painted
    assert np.array_equal(np.asarray(again.data), painted)
    assert np.array_equal(read_image(out).data, expected)
