"""Training data sources, each a list of `Case`s (one per patient or photo) ready for `SliceDataset`.

- Synapse (TransUNet's layout, as DAE-Former's code reads it): `train_npz/caseXXXX_sliceYYY.npz` with `image` (in [0, 1]
  after the [-125, 275] HU window) and `label`; `test_vol_h5/caseXXXX.npy.h5` with `image` and `label` (D, H, W).
  Images are mapped back to HU-equivalent values (x * 400 - 125) so that the checkpoint's abdomen window
  reproduces them exactly and the model then applies to HU volumes from NIfTI or DICOM.
- NIfTI/TIFF folders: `imagesTr/` + `labelsTr/` (Medical Segmentation Decathlon, nnU-Net: `NAME_0000.nii.gz`
  or `NAME.nii.gz` with `NAME.nii.gz`), or `*_image.*` + `*_label.*` pairs in one folder.
- ISIC-style photo folders: `NAME.jpg` + `NAME_segmentation.png` (ISIC 2018), or `images/` + `masks/`
  with matching stems. Masks are binarised (> 0).

Every problem (missing mask, unreadable file, shape mismatch, labels beyond the classes) is collected and
raised as one TrainingError before training starts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_daeformer.base.errors import DaeformerError, TrainingError
from napari_daeformer.io import read_image, suffix_of
from napari_daeformer.io.orientation import radiological
from napari_daeformer.io.record import label_channel, label_values

from .data import Case, synthetic_cases

FORMATS = ("auto", "synapse", "nifti", "isic", "synthetic-ct", "synthetic-skin")
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".tif", ".tiff")
_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def synapse_to_hu(image: np.ndarray) -> np.ndarray:
    """Synapse's [0, 1] (abdomen-windowed) intensities as HU-equivalent float32."""
    return (np.asarray(image, np.float32) * 400.0 - 125.0).astype(np.float32)


def detect_format(root: Path) -> str:
    if not root.is_dir():
        raise TrainingError(f"{root}: no such data folder")
    if (root / "train_npz").is_dir() or (root / "test_vol_h5").is_dir():
        return "synapse"
    if (root / "imagesTr").is_dir() or any(root.glob("*_image.*")):
        return "nifti"
    if any(root.glob("*_segmentation.png")) or ((root / "images").is_dir() and (root / "masks").is_dir()):
        return "isic"
    raise TrainingError(f"{root}: cannot tell the data layout; pass --data-format (one of {', '.join(FORMATS[1:])})")


def load_cases(root: str | Path | None, fmt: str = "auto", *, split: str = "train",
               seeds: list[int] | None = None) -> list[Case]:
    """The cases of a data folder (or of the synthetic generators)."""
    if fmt.startswith("synthetic-"):
        return synthetic_cases(fmt.removeprefix("synthetic-"), seeds or list(range(1, 13)))
    if root is None:
        raise TrainingError("--data is required for data format " + fmt)
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"{root}: no such data folder")
    fmt = detect_format(root) if fmt == "auto" else fmt
    loaders = {"synapse": lambda: synapse_cases(root, split), "nifti": lambda: folder_cases(root),
               "isic": lambda: isic_cases(root)}
    if fmt not in loaders:
        raise TrainingError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return loaders[fmt]()


def synapse_cases(root: Path, split: str = "train") -> list[Case]:
    """Synapse training slices grouped into one case per patient, or the test volumes (split="test")."""
    problems: list[str] = []
    cases: list[Case] = []
    if split == "test":
        try:
            import h5py
        except ImportError as e:
            raise TrainingError("reading Synapse test volumes needs h5py: pip install 'napari-daeformer[h5]'") from e
        files = sorted((root / "test_vol_h5").glob("*.h5"))
        for f in files:
            try:
                with h5py.File(f, "r") as h5:
                    image, label = np.asarray(h5["image"]), np.asarray(h5["label"])
            except Exception as e:
                problems.append(f"{f.name}: unreadable ({e})")
                continue
            cases.append(Case(f.name.split(".")[0], synapse_to_hu(image), label.astype(np.uint8), (1.0, 1.0, 1.0)))
    else:
        groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for f in sorted((root / "train_npz").glob("*.npz")):
            m = re.match(r"(case\d+)_slice(\d+)\.npz$", f.name)
            if not m:
                problems.append(f"{f.name}: not named caseXXXX_sliceYYY.npz")
                continue
            groups[m[1]].append((int(m[2]), f))
        for name, slices in groups.items():
            images, labels = [], []
            for _, f in sorted(slices):
                try:
                    with np.load(f, allow_pickle=False) as npz:
                        images.append(npz["image"])
                        labels.append(npz["label"])
                except Exception as e:
                    problems.append(f"{f.name}: unreadable ({e})")
            if images and len({i.shape for i in images}) == 1:
                cases.append(Case(name, synapse_to_hu(np.stack(images)), np.stack(labels).astype(np.uint8),
                                  (1.0, 1.0, 1.0)))
            elif images:
                problems.append(f"{name}: slices of different sizes")
    if problems:
        raise TrainingError(f"{len(problems)} problem(s) in {root}: " + "; ".join(problems[:20]))
    if not cases:
        raise TrainingError(f"{root}: no Synapse {'test volumes' if split == 'test' else 'training slices'} found")
    return cases


def _read_pair(name: str, image: Path, label: Path | None, problems: list[str], binary: bool = False) -> Case | None:
    if label is None:
        problems.append(f"{name}: no label file for {image.name}")
        return None
    try:
        img, lab = radiological(read_image(image)), radiological(read_image(label))   # as the viewer shows them
    except DaeformerError as e:
        problems.append(str(e))
        return None
    spatial = len(img.spatial_shape)
    try:
        labels = (label_channel(lab.data, spatial) > 0).astype(np.int64) if binary else \
            label_values(lab.data, spatial, label.name)
    except DaeformerError as e:
        problems.append(str(e))
        return None
    return Case(name, img.data, labels, img.spacing)


def folder_cases(root: Path) -> list[Case]:
    """NIfTI/TIFF image-label pairs: imagesTr/labelsTr or *_image/*_label."""
    problems: list[str] = []
    cases = []
    if (root / "imagesTr").is_dir():
        labels = {_stem(p): p for p in (root / "labelsTr").glob("*") if suffix_of(p) in _VOLUME_SUFFIXES} \
            if (root / "labelsTr").is_dir() else {}
        for image in sorted(p for p in (root / "imagesTr").glob("*") if suffix_of(p) in _VOLUME_SUFFIXES):
            name = re.sub(r"_0000$", "", _stem(image))            # nnU-Net v2 channel suffix
            if name.startswith("._"):
                continue
            if (case := _read_pair(name, image, labels.get(name), problems)) is not None:
                cases.append(case)
    else:
        for image in sorted(root.glob("*_image.*")):
            name = _stem(image).removesuffix("_image")
            label = next((p for p in root.glob(f"{name}_label.*") if suffix_of(p) in _VOLUME_SUFFIXES), None)
            if (case := _read_pair(name, image, label, problems)) is not None:
                cases.append(case)
    if problems:
        raise TrainingError(f"{len(problems)} bad pair(s) in {root}: " + "; ".join(problems[:20]))
    if not cases:
        raise TrainingError(f"{root}: no image/label pairs found (imagesTr/ + labelsTr/, or *_image + *_label)")
    return cases


def isic_cases(root: Path) -> list[Case]:
    """ISIC-style RGB photos with binary masks."""
    problems: list[str] = []
    cases = []
    if (root / "images").is_dir():
        masks = {_stem(p): p for p in (root / "masks").glob("*")}
        images = sorted(p for p in (root / "images").glob("*") if suffix_of(p) in _PHOTO_SUFFIXES)
        pairs = [(_stem(p), p, masks.get(_stem(p)) or masks.get(_stem(p) + "_segmentation")) for p in images]
    else:
        images = sorted(p for p in root.glob("*") if suffix_of(p) in _PHOTO_SUFFIXES
                        and not _stem(p).endswith("_segmentation"))
        pairs = [(_stem(p), p, next(iter(root.glob(f"{_stem(p)}_segmentation.*")), None)) for p in images]
    for name, image, mask in pairs:
        if (case := _read_pair(name, image, mask, problems, binary=True)) is not None:
            cases.append(case)
    if problems:
        raise TrainingError(f"{len(problems)} bad pair(s) in {root}: " + "; ".join(problems[:20]))
    if not cases:
        raise TrainingError(f"{root}: no photo/mask pairs found")
    return cases


def _stem(path: Path) -> str:
    name = path.name
    suffix = suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else path.stem


SLAB_MARGIN = 2          # slices left out on each side of a held-out slab: neighbours would leak into validation


def split_cases(cases: list[Case], val_fraction: float, seed: int,
                val_names: list[str] | None = None) -> tuple[list[Case], list[Case], str]:
    """Split by case (patient), never by slice: named cases, or a seeded random fraction (at least one).

    With fewer volumes than the fraction needs (val_fraction * cases < 1), volumes give up a contiguous slab of
    slices each instead (the middle `val_fraction` of the slices, with `SLAB_MARGIN` slices on both sides used by
    neither side), so one annotated volume is enough; a single photo cannot be split and trains without
    validation (2D images are held out whole, at least one when there are two). `val_fraction` 0: no validation.

    Returns:
        (train, val, note): the note says in words how validation was held out.
    """
    if val_names:
        missing = set(val_names) - {c.name for c in cases}
        if missing:
            raise TrainingError(f"validation cases not in the data: {sorted(missing)}")
        val = [c for c in cases if c.name in val_names]
        return [c for c in cases if c.name not in val_names], val, f"validation on the named case(s) {', '.join(val_names)}"
    if not 0 <= val_fraction < 1:
        raise TrainingError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0 or not cases:
        return list(cases), [], "no validation (--val-fraction 0): the best checkpoint is the last"
    flat = all(c.labels.ndim == 2 for c in cases)           # photos / 2D images: held out whole, by image
    if val_fraction * len(cases) >= 1 or (flat and len(cases) >= 2):
        n_val = max(1, round(val_fraction * len(cases)))
        order = np.random.default_rng(seed).permutation(len(cases))
        val = set(order[:n_val].tolist())
        return ([c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val],
                f"{n_val} of {len(cases)} cases held out for validation")
    train, held = [], []
    for case in cases:
        parts = _slab_split(case, val_fraction)
        if parts is None:
            train.append(case)
        else:
            train += parts[0]
            held.append(parts[1])
    if not held:
        return train, [], (f"no validation: {len(cases)} image(s) cannot be split (2D images are held out whole, "
                           "so at least two are needed); the best checkpoint is the last")
    slab = held[0].labels.shape[0]
    return train, held, (f"{len(cases)} case(s): a slab of about {slab} contiguous slices held out from the middle of "
                         f"each volume for validation ({SLAB_MARGIN} slices on each side used by neither)")


def _slab_split(case: Case, fraction: float) -> tuple[list[Case], Case] | None:
    """(training parts above and below, the held-out middle slab) of a volume, or None for a 2D image or a volume
    too thin to give a slab and keep training slices."""
    rgb = case.image.ndim == case.labels.ndim + 1
    if case.labels.ndim != 3 or rgb:
        return None
    z = case.labels.shape[0]
    n = max(1, round(fraction * z))
    start = (z - n) // 2
    below, above = (0, max(0, start - SLAB_MARGIN)), (min(z, start + n + SLAB_MARGIN), z)
    if below[1] - below[0] + above[1] - above[0] < 1:
        return None

    def part(lo: int, hi: int) -> Case:
        return Case(f"{case.name}[{lo}:{hi}]", case.image[lo:hi], case.labels[lo:hi], case.spacing, case.preprocessing)

    return [part(lo, hi) for lo, hi in (below, above) if hi > lo], part(start, start + n)
