"""Hostile images: damaged geometry and memory bombs are refused when read, in one line naming the file and the
problem, through the library and the CLI (exit 2, no output file)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.base.memory import ENV
from napari_daeformer.io import read_image, write_labels

from ..conftest import write_dicom_series
from .hostile import nifti_bomb, nifti_with_srow_x

BAD_ROWS = {"nan": ((math.nan, 0, 0, 0), "NaN or infinite"), "inf": ((math.inf, 0, 0, 0), "NaN or infinite"),
            "singular": ((0, 0, 0, 0), "singular")}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_damaged_affine_refused_when_read(tmp_path: Path, kind: str) -> None:
    row, message = BAD_ROWS[kind]
    path = nifti_with_srow_x(tmp_path / f"{kind}.nii.gz", row)
    with pytest.raises(ImageFormatError, match=f"{kind}.nii.gz: .*{message}"):
        read_image(path)


def test_damaged_affine_refused_by_the_writer() -> None:
    geometry = {"affine": np.diag([1.0, 0.0, 1.0, 1.0]).tolist(), "spacing": [1.0, 1.0, 1.0],
                "spatial_shape": [2, 8, 8]}
    with pytest.raises(ImageFormatError, match="singular"):
        write_labels(Path("never.nii.gz"), np.zeros((2, 8, 8), np.uint8), geometry)
    assert not Path("never.nii.gz").exists()


def test_header_announcing_gigabytes_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = nifti_bomb(tmp_path / "tiny.nii.gz", (2048, 2048, 1024))        # 17 GB announced in a 63-byte file
    assert tiny.stat().st_size < 100
    start = time.perf_counter()
    with pytest.raises(ImageFormatError, match=r"tiny.nii.gz: reading 2048x2048x1024 int32 voxels needs 36.0 GB"):
        read_image(tiny)
    assert time.perf_counter() - start < 1.0
    # 2 MB on disk, 0.4 GB of int16 voxels scaled by nibabel to float64: the copies count, not just the voxels
    scaled = nifti_bomb(tmp_path / "scaled.nii.gz", (512, 512, 800), np.int16, slope=2.0, data_bytes=512 * 512 * 800 * 2)
    assert scaled.stat().st_size < 3e6
    monkeypatch.setenv(ENV, "1G")
    with pytest.raises(ImageFormatError, match=rf"needs 2.1 GB of memory, more than the limit {ENV}=1G"):
        read_image(scaled)


def test_the_user_can_raise_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = nifti_bomb(tmp_path / "small.nii.gz", (64, 64, 16), np.int16, data_bytes=64 * 64 * 16 * 2)
    monkeypatch.setenv(ENV, "100K")
    with pytest.raises(ImageFormatError, match="more than the limit"):
        read_image(path)
    monkeypatch.setenv(ENV, "1M")
    assert read_image(path).data.shape == (16, 64, 64)


def test_sixteen_bit_rgb_tiff_is_a_photo(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 65535, (40, 30, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    record = read_image(tmp_path / "rgb16.tif")
    assert record.rgb and record.spatial_shape == (40, 30) and record.data.dtype == np.uint16
    tifffile.imwrite(tmp_path / "grey.tif", rgb[..., 0][None].repeat(3, 0), photometric="minisblack")
    assert not read_image(tmp_path / "grey.tif").rgb                       # a 3-slice grey stack stays a volume


def test_pipe_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.nii.gz")
    with pytest.raises(ImageFormatError, match="not a regular file"):
        read_image(tmp_path / "pipe.nii.gz")


def _cli_refuses(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_refuses_each_in_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "labels.nii.gz"
    bad = nifti_with_srow_x(tmp_path / "bad.nii.gz", (math.nan, 0, 0, 0))
    _cli_refuses(["segment", str(bad), str(out), "--device", "cpu"], "bad.nii.gz: the voxel-to-world affine", capsys)
    bomb = nifti_bomb(tmp_path / "bomb.nii.gz", (2048, 2048, 1024))
    _cli_refuses(["segment", str(bomb), str(out), "--device", "cpu"], "needs 36.0 GB", capsys)
    small = nifti_bomb(tmp_path / "small.nii.gz", (64, 64, 4), np.int16, data_bytes=64 * 64 * 4 * 2)
    monkeypatch.setenv(ENV, "")                                            # restored after the test
    _cli_refuses(["--memory-limit", "10K", "segment", str(small), str(out), "--device", "cpu"],
                 f"more than the limit {ENV}=10K", capsys)
    _cli_refuses(["--memory-limit", "lots", "segment", str(small), str(out)], "give a size such as 64G", capsys)
    os.mkfifo(tmp_path / "pipe.nii.gz")
    _cli_refuses(["segment", str(tmp_path / "pipe.nii.gz"), str(out)], "not a regular file", capsys)
    _cli_refuses(["segment", str(small), str(small), "--overwrite"], "is the input image", capsys)
    assert not out.exists() and small.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left either


def test_a_bug_in_our_reader_is_a_traceback_not_a_bad_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Only the library calls that parse a file are wrapped: an error of our own code reaches the developer."""
    import napari_daeformer.io.nifti as nifti_module
    from napari_daeformer.io import read_image
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine

    path = write_nifti(tmp_path / "scan.nii.gz", np.zeros((2, 8, 8), np.int16), default_affine((1.0, 1.0, 1.0)))

    def planted(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("a planted bug")

    monkeypatch.setattr(nifti_module, "check_pixels", planted)
    with pytest.raises(ZeroDivisionError, match="planted"):
        read_image(path)
    import napari_daeformer.io.dicom as dicom_module  # DICOM wrapped our stacking code as well

    write_dicom_series(tmp_path / "ct", np.full((2, 8, 8), 1000, np.uint16), (2.0, 1.0, 1.0))
    monkeypatch.setattr(dicom_module, "series_geometry", planted)
    with pytest.raises(ZeroDivisionError, match="planted"):
        read_image(tmp_path / "ct")


@pytest.mark.parametrize("z", [-3.0, 0.0, float("nan"), float("inf")])
def test_a_tiff_spacing_that_is_no_size_reads_as_one_with_a_note(tmp_path: Path, z: float) -> None:
    """ImageJ spacing -3 / 0 / NaN / inf gave negative, zero or NaN volumes with rc 0: now 1 per voxel, said."""
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint8), imagej=True, metadata={"spacing": z, "unit": "mm"})
    record = read_image(path)
    assert record.spacing[0] == 1.0 and all(math.isfinite(s) and s > 0 for s in record.spacing)
    assert any("not positive and finite" in n for n in record.notes)


def test_nifti_spacing_is_the_sform_it_writes_back(tmp_path: Path) -> None:
    """A 0.8 x 0.8 x 3 mm sform with pixdim 1 gave volumes from pixdim (half the real size): now the sform, noted."""
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    img = nib.Nifti1Image(np.zeros((10, 10, 4), np.int16), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(None, code=0)
    img.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(img, tmp_path / "scan.nii.gz")
    record = read_image(tmp_path / "scan.nii.gz")
    assert record.spacing == pytest.approx((3.0, 0.8, 0.8))
    assert any("pixdim" in n and "sform" in n for n in record.notes)


def test_a_voxel_of_no_plausible_size_is_refused(tmp_path: Path) -> None:
    """pixdim 1e30 (no sform) gave 1e90 mL with rc 0."""
    img = nib.Nifti1Image(np.zeros((10, 10, 4), np.int16), None)
    img.header.set_zooms((1e30, 1.0, 1.0))
    nib.save(img, tmp_path / "huge.nii.gz")
    with pytest.raises(ImageFormatError, match="huge.nii.gz: a voxel size of 1e\\+30"):
        read_image(tmp_path / "huge.nii.gz")


def test_an_unnormalised_dicom_orientation_keeps_the_voxel_size(tmp_path: Path) -> None:
    """ImageOrientationPatient [2,0,0,0,2,0] gave 4x the volume."""
    import pydicom

    write_dicom_series(tmp_path / "ct", np.full((3, 8, 8), 1000, np.uint16), (2.5, 0.7, 0.7))
    for f in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [2, 0, 0, 0, 2, 0]
        ds.save_as(f)
    record = read_image(tmp_path / "ct")
    assert record.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert np.linalg.norm(record.affine[:3, :3], axis=0) == pytest.approx((0.7, 0.7, 2.5))


def test_a_negative_slice_thickness_is_no_negative_volume(tmp_path: Path) -> None:
    """One DICOM slice with SliceThickness -1 gave a volume of -1.0 mL."""
    import pydicom

    write_dicom_series(tmp_path / "ct", np.full((1, 8, 8), 1000, np.uint16), (2.0, 1.0, 1.0))
    f = next((tmp_path / "ct").iterdir())
    ds = pydicom.dcmread(f)
    ds.SliceThickness = -1.0
    ds.save_as(f)
    assert read_image(f).spacing[0] == 1.0


def test_the_memory_limit_holds_for_photos(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A small PNG of many pixels peaked at 1.77 GB under a 50M limit: the header is now checked first."""
    from PIL import Image

    Image.new("RGB", (4000, 4000)).save(tmp_path / "wide.png")
    assert (tmp_path / "wide.png").stat().st_size < 200_000
    monkeypatch.setenv(ENV, "")
    _cli_refuses(["--memory-limit", "50M", "segment", str(tmp_path / "wide.png"), str(tmp_path / "out.png")],
                 "wide.png: decoding a 4000x4000 RGB image needs", capsys)
    assert not (tmp_path / "out.png").exists()


def test_a_dicom_pixel_spacing_of_zero_is_refused_when_read(tmp_path: Path) -> None:
    """PixelSpacing 0 read as zero-size voxels and failed only when the labels were written, the work lost."""
    import pydicom

    write_dicom_series(tmp_path / "ct", np.full((2, 8, 8), 1000, np.uint16), (2.0, 1.0, 1.0))
    for f in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0, 0]
        ds.save_as(f)
    with pytest.raises(ImageFormatError, match="ct: the voxel-to-world affine is singular"):
        read_image(tmp_path / "ct")
