"""Property-based: whatever bytes or arrays the readers get, only ImageFormatError escapes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage import io as skio

from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image

SUFFIXES = [".nii", ".nii.gz", ".tif", ".png", ".jpg", ".bmp", ".dcm"]


def _read_or_refuse(path: Path) -> None:
    try:
        record = read_image(path)
    except ImageFormatError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert record.data.size > 0 and np.isfinite(record.data).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from(SUFFIXES), header=st.booleans())
def test_random_bytes(data: bytes, suffix: str, header: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        prefix = {".nii": b"\x5c\x01\x00\x00", ".png": b"\x89PNG\r\n\x1a\n", ".tif": b"II*\x00",
                  ".dcm": b"\0" * 128 + b"DICM"}.get(suffix, b"") if header else b""
        path.write_bytes(prefix + data)
        _read_or_refuse(path)


DTYPES = [np.uint8, np.int16, np.uint16, np.float32, np.float64, np.int32, np.bool_]


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), dtype=st.sampled_from(DTYPES),
       fmt=st.sampled_from(["nii", "tif", "png"]), fill=st.sampled_from([0.0, 1.0, np.nan, np.inf, -3.5]))
def test_random_shapes_and_dtypes(shape: list[int], dtype: type, fmt: str, fill: float) -> None:
    arr = np.full(shape, 0).astype(dtype)
    if np.issubdtype(arr.dtype, np.floating):
        arr.flat[0] = fill
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"a.{fmt}"
        try:
            if fmt == "nii":
                nib.save(nib.Nifti1Image(arr.astype(np.uint8) if dtype is np.bool_ else arr, np.eye(4)), str(path))
            elif fmt == "tif":
                tifffile.imwrite(str(path), arr)
            else:
                skio.imsave(str(path), arr, check_contrast=False)
        except Exception:  # the writing library refuses this array: nothing to read
            return
        _read_or_refuse(path)
