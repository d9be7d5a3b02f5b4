"""Readers and writers keep geometry; bad files give one clear ImageFormatError."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from skimage import io as skio

from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image, write_labels


def oblique_affine() -> np.ndarray:
    th = 0.35
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.1, 0.995]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.78, 0.82, 2.5])
    affine[:3, 3] = [-180.25, 95.5, -40.0]
    return affine


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_oblique_affine(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 1500, size=(40, 32, 12)).astype(np.int16)      # (X, Y, Z) on disk
    src = tmp_path / f"ct{suffix}"
    nib.save(nib.Nifti1Image(vol, oblique_affine()), str(src))
    record = read_image(src)
    assert record.data.shape == (12, 32, 40)                                  # (Z, Y, X)
    assert record.modality == "ct" and record.dtype == "int16"
    np.testing.assert_allclose(record.spacing, np.linalg.norm(oblique_affine()[:3, :3], axis=0)[::-1], rtol=1e-5)
    labels = (record.data > 0).astype(np.uint8) + (record.data > 800)
    out = write_labels(tmp_path / f"labels{suffix}", labels, record)
    back = read_image(out)
    assert np.array_equal(back.affine, record.affine)
    assert np.array_equal(back.data, labels) and back.data.shape == record.data.shape
    assert nib.aff2axcodes(nib.load(str(out)).affine) == nib.aff2axcodes(nib.load(str(src)).affine)
    assert np.issubdtype(nib.load(str(out)).get_data_dtype(), np.integer)


def test_nifti_2d(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.arange(30, dtype=np.float32).reshape(6, 5), np.diag([0.5, 0.4, 1, 1])),
             str(tmp_path / "slice.nii"))
    record = read_image(tmp_path / "slice.nii")
    assert record.data.shape == (5, 6) and record.spacing == pytest.approx((0.4, 0.5))


def test_writer_never_replaces_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "mask.png"
    write_labels(path, np.ones((4, 4), np.uint8))
    with pytest.raises(Exception, match="already exists"):
        write_labels(path, np.zeros((4, 4), np.uint8))
    assert read_image(path).data.max() == 1
    write_labels(path, np.zeros((4, 4), np.uint8), overwrite=True)
    assert read_image(path).data.max() == 0


def test_png_refuses_volumes_and_jpeg(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="one 2D slice"):
        write_labels(tmp_path / "v.png", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ImageFormatError, match="lossy"):
        write_labels(tmp_path / "m.jpg", np.zeros((4, 4), np.uint8))


def test_tiff_stack_spacing_round_trip(tmp_path: Path) -> None:
    labels = np.zeros((5, 16, 20), np.uint8)
    labels[2, 4:8, 5:9] = 3
    geometry = {"affine": np.diag([0.7, 0.6, 2.0, 1.0]).tolist(), "spacing": [2.0, 0.6, 0.7],
                "spatial_shape": [5, 16, 20]}
    out = write_labels(tmp_path / "stack.tif", labels, geometry)
    back = read_image(out)
    assert np.array_equal(back.data, labels)
    assert back.spacing == pytest.approx((2.0, 0.6, 0.7), rel=1e-4)


def test_tiff_resolution_in_centimetres(tmp_path: Path) -> None:
    img = np.zeros((10, 12), np.uint16)
    tifffile.imwrite(str(tmp_path / "res.tif"), img, resolution=(100.0, 50.0), resolutionunit="CENTIMETER")
    assert read_image(tmp_path / "res.tif").spacing == pytest.approx((0.2, 0.1))


@pytest.mark.parametrize("kind", ["rgb", "rgba", "gray", "gray16"])
def test_photos(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    data = {"rgb": rng.integers(0, 255, (20, 30, 3), dtype=np.uint8),
            "rgba": rng.integers(0, 255, (20, 30, 4), dtype=np.uint8),
            "gray": rng.integers(0, 255, (20, 30), dtype=np.uint8),
            "gray16": rng.integers(0, 65535, (20, 30), dtype=np.uint16)}[kind]
    skio.imsave(str(tmp_path / "p.png"), data, check_contrast=False)
    record = read_image(tmp_path / "p.png")
    assert record.spatial_shape == (20, 30)
    assert record.rgb == kind.startswith("rgb")
    assert ("alpha channel dropped" in record.notes) == (kind == "rgba")
    assert np.array_equal(record.data, data[..., :3] if kind == "rgba" else data)
    assert record.dtype == ("uint16" if kind == "gray16" else "uint8")


def _bad_files(tmp: Path) -> dict[str, str]:
    """file name -> the words its error must contain."""
    (tmp / "empty.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp / "ok.nii.gz"))
    raw = (tmp / "ok.nii.gz").read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp / "text.nii").write_text("patient notes, not an image\n" * 20)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp / "four_d.nii"))
    skio.imsave(str(tmp / "tiny.png"), np.zeros((1, 1), np.uint8), check_contrast=False)
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3], nan[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp / "nan.nii"))
    (tmp / "notes.docx").write_bytes(b"PK\x03\x04 word document")
    return {"empty.nii.gz": "empty", "truncated.nii.gz": "truncated", "text.nii": "not a readable NIfTI",
            "four_d.nii": "not a 2D image or 3D volume", "tiny.png": "too small", "nan.nii": "NaN or infinite",
            "notes.docx": "unsupported file type"}


def test_bad_input_gives_one_clear_line(tmp_path: Path) -> None:
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(ImageFormatError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert words in message and name in message and "\n" not in message, message


def test_a_label_map_another_tool_wrote_opens_as_labels(tmp_path: Path) -> None:
    """A `*_label.nii.gz` from Slicer or ITK-SNAP (int16, a handful of values, no 'label' intent) opened as an
    Image that could not be painted or trained on; a scan, an 8-bit image and an empty map stay images."""
    import nrrd

    from napari_daeformer.plugin.reader import read_layers

    mask = np.zeros((6, 16, 16), np.int16)
    mask[1:4, 2:8, 2:8], mask[2:5, 9:12, 9:12] = 1, 7
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])                       # stored as shown (LPS): compared voxel for voxel
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), tmp_path / "scan_label.nii.gz")
    nrrd.write(str(tmp_path / "mask.nrrd"), mask.transpose(2, 1, 0))
    ct = (np.arange(6 * 16 * 16).reshape(6, 16, 16) % 1500 - 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(ct.transpose(2, 1, 0), affine), tmp_path / "ct.nii.gz")
    grey = (np.arange(16 * 16).reshape(16, 16) % 200).astype(np.uint8)
    nib.save(nib.Nifti1Image(grey.T, affine), tmp_path / "grey.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.uint8), affine), tmp_path / "blank.nii.gz")
    for name in ("scan_label.nii.gz", "mask.nrrd"):
        (data, meta, kind), = read_layers(str(tmp_path / name))
        assert kind == "labels" and data.dtype == np.uint8 and np.array_equal(data, mask), name
    assert np.allclose(read_layers(str(tmp_path / "scan_label.nii.gz"))[0][1]["scale"], [3.0, 0.8, 0.8])
    for name in ("ct.nii.gz", "grey.nii.gz", "blank.nii.gz"):
        assert read_layers(str(tmp_path / name))[0][2] == "image", name
