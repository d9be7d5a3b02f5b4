"""DICOM series: sorted by position, rescaled to HU, geometry kept; mixed or gappy series refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image, write_labels

from ..conftest import write_dicom_series


def test_series_sorted_rescaled_with_geometry(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 2000, (6, 16, 20)).astype(np.uint16)
    write_dicom_series(tmp_path / "ct", stored, (2.5, 0.7, 0.6), slope=1.0, intercept=-1024.0)
    record = read_image(tmp_path / "ct")
    assert record.data.shape == (6, 16, 20) and record.modality == "ct" and record.source_format == "dicom"
    np.testing.assert_array_equal(record.data, stored.astype(np.float32) - 1024.0)
    assert record.spacing == pytest.approx((2.5, 0.7, 0.6))
    # LPS origin (-100, -120, 50) becomes RAS (100, 120, 50); column steps go along -x (RAS), rows along -y.
    np.testing.assert_allclose(record.affine[:3, 3], [100.0, 120.0, 50.0])
    np.testing.assert_allclose(np.diag(record.affine)[:3], [-0.6, -0.7, 2.5])
    out = write_labels(tmp_path / "mask.nii.gz", (record.data > 0).astype(np.uint8), record)
    assert np.array_equal(read_image(out).affine, record.affine.astype(np.float32).astype(np.float64))


def test_mixed_series_refused(tmp_path: Path) -> None:
    vol = np.zeros((3, 8, 8), np.uint16)
    write_dicom_series(tmp_path / "mix", vol, (2.0, 1.0, 1.0), series_uid="1.2.3.1", prefix="a")
    write_dicom_series(tmp_path / "mix", vol, (2.0, 1.0, 1.0), series_uid="1.2.3.2", prefix="b")
    with pytest.raises(ImageFormatError, match="2 DICOM series are mixed"):
        read_image(tmp_path / "mix")


def test_missing_slice_reported(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "gap", np.zeros((6, 8, 8), np.uint16), (2.0, 1.0, 1.0), skip=(3,))
    with pytest.raises(ImageFormatError, match="missing or irregularly spaced"):
        read_image(tmp_path / "gap")
