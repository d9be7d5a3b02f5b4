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
from ..io.hostile import nifti_bomb, nifti_with_srow_x
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
    (again,) = viewer.open(str(out), plugin="napari-daeformer")     # stored as the source is, shown as painted
    assert np.array_equal(np.asarray(again.data), labels)           # (tests/widgets/test_orientation.py)


def test_sample_data_menu_entries(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    viewer.open_sample("napari-daeformer", "synthetic_ct")
    ct = viewer.layers["synthetic CT"]
    assert ct.data.shape == (48, 192, 192) and tuple(ct.scale) == (3.0, 0.8, 0.8)
    viewer.open_sample("napari-daeformer", "synthetic_skin")
    assert viewer.layers["synthetic skin"].rgb


def _hostile(tmp: Path) -> dict[str, str]:
    """file -> what its error notification says."""
    (tmp / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    nifti_with_srow_x(tmp / "nan_affine.nii.gz", (float("nan"), 0, 0, 0))
    nifti_with_srow_x(tmp / "singular.nii", (0, 0, 0, 0))
    nifti_bomb(tmp / "bomb.nii.gz", (2048, 2048, 1024))
    return {"broken.nii.gz": "not a readable NIfTI", "nan_affine.nii.gz": "NaN or infinite",
            "singular.nii": "singular", "bomb.nii.gz": "needs 36.0 GB of memory"}


def test_unreadable_files_are_notifications_not_layers(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from napari.utils.notifications import NotificationSeverity, notification_manager

    viewer = make_napari_viewer()
    for name, message in _hostile(tmp_path).items():
        before = len(notification_manager.records)
        assert viewer.open(str(tmp_path / name), plugin="napari-daeformer") == []
        (note,) = notification_manager.records[before:]
        assert note.severity == NotificationSeverity.ERROR and name in note.message and message in note.message
    assert len(viewer.layers) == 0
    _files(tmp_path)                                         # one bad file among good ones: the good ones open
    layers = viewer.open([str(tmp_path / "photo.png"), str(tmp_path / "bomb.nii.gz")], plugin="napari-daeformer")
    assert [layer.name for layer in layers] == ["photo"]


@pytest.mark.parametrize("name", ["mask.nii.gz", "mask.tif", "photo_mask.tif", "photo_mask.png"])
def test_a_saved_mask_reopens_as_paintable_labels(make_napari_viewer, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """Saved with File > Save (our writer), opened again with File > Open (our reader): a Labels layer with the same
    values and scale, not a black image. A TIFF or PNG with the same values not written as labels stays an image; a
    NIfTI of a few whole numbers from 0 is a label map whoever wrote it (`io.record.looks_like_labels`)."""
    viewer = make_napari_viewer()
    volume = not name.startswith("photo")
    data = np.zeros((4, 16, 16) if volume else (16, 16), np.uint8)
    data[..., 4:8, 4:8] = 3
    scale = (3.0, 0.8, 0.8) if volume else (1.0, 1.0)
    layer = viewer.add_labels(data, name="mask", scale=scale)
    path = tmp_path / name
    layer.save(str(path), plugin="napari-daeformer")
    (back,) = viewer.open(str(path), plugin="napari-daeformer")
    assert back._type_string == "labels" and np.array_equal(back.data, data)
    np.testing.assert_allclose(back.scale, scale, rtol=1e-5)
    plain = tmp_path / f"plain{path.suffix if not name.endswith('.nii.gz') else '.nii.gz'}"
    if name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(data.T, np.eye(4)), str(plain))
    elif name.endswith(".tif"):
        tifffile.imwrite(str(plain), data, photometric="minisblack")
    else:
        skio.imsave(str(plain), data, check_contrast=False)
    (image,) = viewer.open(str(plain), plugin="napari-daeformer")
    assert image._type_string == ("labels" if name.endswith(".nii.gz") else "image")   # a NIfTI mask: labels


def _fresh_activation() -> None:
    """The plugin as on a new install: not yet activated in this napari session."""
    from npe2 import PluginManager

    PluginManager.instance().deactivate("napari-daeformer")


def test_napari_opens_medical_files_with_our_reader_once_the_plugin_is_used(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two readers claim .nii.gz (napari's imageio one fails on it): the first use of the plugin makes ours the
    preference, so napari's open with no plugin named (File > Open, drag and drop, `napari scan.nii.gz`: plugin
    None) reads it with its spacing. `viewer.open(path)` in a script means napari's builtin reader by default."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    scale = _files(tmp_path)["ct.nii.gz"]
    viewer = make_napari_viewer()                               # napari's settings reset: no preference
    _fresh_activation()
    with pytest.raises(MultipleReaderError):
        viewer.open(str(tmp_path / "ct.nii.gz"), plugin=None)
    viewer.open_sample("napari-daeformer", "synthetic_ct")      # the plugin's first use activates it
    assert get_settings().plugins.extension2reader["*.nii.gz"] == "napari-daeformer"
    (layer,) = viewer.open(str(tmp_path / "ct.nii.gz"), plugin=None)
    np.testing.assert_allclose(layer.scale, scale, rtol=1e-5)
    assert METADATA_KEY in layer.metadata


def test_a_reader_the_user_chose_is_kept(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    from napari.settings import get_settings

    make_napari_viewer()
    _fresh_activation()
    get_settings().plugins.extension2reader = {"*.nii.gz": "napari"}
    from npe2 import PluginManager

    PluginManager.instance().activate("napari-daeformer")
    chosen = get_settings().plugins.extension2reader
    assert chosen["*.nii.gz"] == "napari" and chosen["*.nii"] == chosen["*.dcm"] == "napari-daeformer"
    assert chosen["*.nrrd"] == chosen["*.nhdr"] == "napari-daeformer"        # asked every time before


def test_after_the_readme_demo_napari_opens_scans_with_no_dialog(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fresh install (no reader preference, the plugin never activated), then the README's first command
    (`daeformer demo`: the sample and the Segment dock): `napari scan.nii.gz`, `scan.nrrd` and `scan.seg.nrrd`
    (napari's open with no plugin named, which raises where its dialog would ask) read through our reader, with
    their geometry; the segmentation opens as Labels."""
    import nrrd
    from napari.errors import MultipleReaderError

    from napari_daeformer.io.nrrd import write_seg_nrrd
    from napari_daeformer.plugin.widgets.launch import demo_viewer

    _files(tmp_path)
    nrrd.write(str(tmp_path / "scan.nrrd"), np.full((6, 8, 5), -500, np.int16),
               {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 2.5]),
                "space origin": np.zeros(3)})
    write_seg_nrrd(tmp_path / "scan.seg.nrrd", np.ones((5, 8, 6), np.uint8), np.diag([-0.7, -0.7, 2.5, 1.0]),
                   ("background", "liver"), ("#000000", "#ff0000"))
    viewer = make_napari_viewer()                               # napari's settings reset: no preference
    _fresh_activation()
    with pytest.raises(MultipleReaderError):
        viewer.open(str(tmp_path / "scan.nrrd"), plugin=None)
    demo_viewer(viewer)
    for name, kind in (("ct.nii.gz", "image"), ("scan.nrrd", "image"), ("scan.seg.nrrd", "labels")):
        (layer,) = viewer.open(str(tmp_path / name), plugin=None)
        assert layer._type_string == kind and METADATA_KEY in layer.metadata, name
    np.testing.assert_allclose(viewer.layers["scan"].scale, (2.5, 0.7, 0.7), rtol=1e-5)
