"""Crafted image files that once got past the readers: damaged geometry, headers announcing gigabytes."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

SROW_X = 280          # byte offset of srow_x (4 float32) in a NIfTI-1 header


def nifti_with_srow_x(path: Path, row: tuple[float, float, float, float], shape: tuple[int, ...] = (24, 20, 3)) -> Path:
    """A valid NIfTI whose sform's first row is `row` (NaN, inf or zeros: no place in space)."""
    img = nib.Nifti1Image(np.full(shape, -200, np.int16), np.eye(4))
    img.header.set_sform(np.eye(4), code=1)
    raw = bytearray(img.to_bytes())
    raw[SROW_X:SROW_X + 16] = struct.pack("<4f", *row)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def nifti_bomb(path: Path, shape: tuple[int, int, int], dtype: type = np.int32, slope: float = 1.0,
               data_bytes: int = 0) -> Path:
    """A .nii.gz whose header announces `shape` voxels but which holds only `data_bytes` zero bytes (compressed:
    a few bytes or kilobytes on disk)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_slope_inter(slope, 0.0)
    header.set_sform(np.eye(4), code=1)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * data_bytes
    path.write_bytes(gzip.compress(raw, compresslevel=9))
    return path
