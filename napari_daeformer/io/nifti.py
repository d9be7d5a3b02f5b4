"""NIfTI (.nii, .nii.gz) with nibabel: the affine kept exactly, arrays in (Z, Y, X) order."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import ImageFormatError, first_line
from napari_daeformer.base.memory import check_allocation
from napari_daeformer.io.record import ImageRecord, affine_spacing, check_affine, check_pixels, looks_like_labels


def read_nifti(path: Path) -> ImageRecord:
    """Read a 2D or 3D NIfTI; a trailing axis of length 1 is dropped, anything else 4D is refused."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers
        raise ImageFormatError(f"{path.name}: not a readable NIfTI file ({first_line(e)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageFormatError(f"{path.name}: not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) not in (2, 3):
        raise ImageFormatError(f"{path.name}: NIfTI of shape {tuple(img.shape)} is not a 2D image or 3D volume "
                               "(4D time series and vector images are not supported; extract one volume first)")
    affine = check_affine(img.affine, path.name)
    dtype = img.get_data_dtype()
    voxels = math.prod(shape)
    scaled = img.dataobj.slope != 1 or img.dataobj.inter != 0       # nibabel scales to floats: another copy
    check_allocation(path.name, voxels * (dtype.itemsize + (8 if scaled else dtype.itemsize) + 1),
                     f"reading {'x'.join(map(str, shape))} {dtype} voxels", ImageFormatError)
    if str(path).endswith(".nii") and img.dataobj.offset + voxels * dtype.itemsize > path.stat().st_size:
        raise ImageFormatError(f"{path.name}: file is truncated (header says {shape} {dtype}, data is shorter)")
    try:
        raw = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as e:  # truncated gzip streams raise EOFError, zlib.error, OSError, ValueError
        raise ImageFormatError(f"{path.name}: NIfTI data is truncated or corrupt ({first_line(e)})") from e
    data = np.ascontiguousarray(raw.transpose(tuple(range(raw.ndim))[::-1]))  # (X, Y[, Z]) -> ([Z,] Y, X)
    check_pixels(data, path.name)
    spacing = affine_spacing(affine, len(shape))              # what the affine we write back says
    pixdim = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])[::-1]
    notes = ()
    if not np.allclose(spacing, pixdim, rtol=1e-3):
        notes = (f"{path.name}: the header's pixdim ({_mm(pixdim)}) disagrees with its sform ({_mm(spacing)}); "
                 "the sform is used, as it places the voxels in space",)
    modality = "ct" if data.size and np.issubdtype(data.dtype, np.number) and float(data.min()) < -500 else "gray"
    is_labels = img.header.get_intent()[0] == "label" or looks_like_labels(data)
    return ImageRecord(data=data, spacing=spacing, affine=affine, dtype=str(dtype), path=path,
                       modality="gray" if is_labels else modality, source_format="nifti", is_labels=is_labels,
                       notes=notes)


def _mm(spacing: tuple[float, ...]) -> str:
    return " x ".join(f"{s:.4g}" for s in spacing) + " mm"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, overwrite: bool = False,
                labels: bool = False) -> Path:
    """Write a ([Z,] Y, X) array with `affine` (NIfTI convention) atomically; mm units, sform and qform set;
    `labels`: marked as a label map (NIfTI intent "label", as ITK-SNAP and 3D Slicer read it)."""
    affine = check_affine(affine, path.name)
    img = nib.Nifti1Image(data.transpose(tuple(range(data.ndim))[::-1]), affine)   # F-ordered view: no copy
    img.header.set_xyzt_units("mm")
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    if labels:
        img.header.set_intent("label")
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite)
