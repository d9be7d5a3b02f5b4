"""Photos (PNG, JPEG, BMP) with scikit-image: RGB, RGBA (alpha dropped), greyscale, 16-bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from skimage import io as skio

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import ImageFormatError, first_line
from napari_daeformer.base.memory import check_allocation
from napari_daeformer.io.record import LABELS_MARK, ImageRecord, check_pixels, default_affine

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def read_photo(path: Path) -> ImageRecord:
    """Read a photo into (Y, X, 3) uint8/uint16 RGB or (Y, X) greyscale; spacing is 1 pixel."""
    _check_size(path)
    try:
        data = np.asarray(skio.imread(str(path)))
    except Exception as e:
        raise ImageFormatError(f"{path.name}: not a readable image ({first_line(e)})") from e
    notes: tuple[str, ...] = ()
    if data.ndim == 3 and data.shape[-1] == 4:
        data, notes = data[..., :3], ("alpha channel dropped",)
    elif data.ndim == 3 and data.shape[-1] == 2:                   # grey + alpha
        data, notes = data[..., 0], ("alpha channel dropped",)
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[-1] == 3)):
        raise ImageFormatError(f"{path.name}: image of shape {data.shape} is neither greyscale nor RGB")
    check_pixels(data, path.name)
    rgb = data.ndim == 3
    return ImageRecord(data=np.ascontiguousarray(data), spacing=(1.0, 1.0), affine=default_affine((1.0, 1.0)),
                       dtype=str(data.dtype), path=path, modality="rgb" if rgb else "gray", source_format="photo",
                       notes=notes, is_labels=not rgb and _marked(path))


def _check_size(path: Path) -> None:
    """Refuse, from the header alone, a photo whose pixels would not fit the memory limit (a 112 KB PNG can hold
    gigabytes of pixels): decoded, converted and stacked, about three copies."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)     # the memory limit decides here
            with Image.open(path) as im:
                (width, height), bands, mode = im.size, len(im.getbands()), im.mode
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return                                                  # the reader says what is wrong with the file
    depth = 4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    check_allocation(path.name, 3 * width * height * bands * depth, f"decoding a {width}x{height} {mode} image",
                     ImageFormatError)


def _marked(path: Path) -> bool:
    """Whether a PNG carries the text chunk `write_png` puts in label maps."""
    from PIL import Image, UnidentifiedImageError

    key, value = LABELS_MARK
    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(key) == value
    except (OSError, UnidentifiedImageError):
        return False


def write_png(path: Path, labels: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write a (Y, X) label map as PNG (uint8, or uint16 above 255 classes). JPEG is refused: it is lossy."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise ImageFormatError(f"{path.name}: JPEG is lossy and would corrupt label values; save masks as PNG")
    if labels.ndim != 2:
        raise ImageFormatError(f"{path.name}: PNG holds one 2D slice, got labels of shape {labels.shape}; "
                               "use .nii.gz or .tif for volumes")
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)
    info = PngInfo()
    info.add_text(*LABELS_MARK)                                   # read back as a label map

    def write(tmp: Path) -> None:
        Image.fromarray(out).save(tmp, format="PNG", pnginfo=info)
    return atomic_write(path, write, overwrite=overwrite)
