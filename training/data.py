"""Training data as 2D slices: in-memory volumes (napari layers, synthetic samples) preprocessed once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.io.sample_data import synthetic_ct, synthetic_skin
from napari_daeformer.model.preprocessing import Preprocessing

from .losses import IGNORE


@dataclass(frozen=True)
class Case:
    """One training case: a volume or photo with its labels.

    Args:
        name: identifier (patient / file), the unit of the train/validation split.
        image: ([Z,] Y, X) intensities or (Y, X, 3) RGB.
        labels: ([Z,] Y, X) integer classes.
        spacing: mm per spatial axis.
        preprocessing: the normalisation measured on the whole image these slices come from (z-score), when the
            case holds only some of its slices; None: measured on `image`.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...] = ()
    preprocessing: Preprocessing | None = None


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """{label value: voxel count} of an integer label map."""
    if labels.size and labels.min() >= 0 and labels.max() < 2**16:
        counts = np.bincount(labels.ravel().astype(np.int64, copy=False))
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def stray_labels(labels: np.ndarray, num_classes: int) -> str | None:
    """'label value(s) 255 (1 voxel), ...' for the values of `labels` outside 0..num_classes-1, or None."""
    beyond = {v: n for v, n in label_counts(labels).items() if not 0 <= v < num_classes}
    if not beyond:
        return None
    listed = ", ".join(f"{v} ({n} voxel{'s' if n > 1 else ''})" for v, n in sorted(beyond.items())[:5])
    return f"label value(s) {listed}{' ...' if len(beyond) > 5 else ''}"


def detect_num_classes(cases: Sequence[Case]) -> int:
    """Classes found in the data: 0, 1, 2, ... up to the first value no case holds. Values beyond that gap (a stray
    255 in one mask) are not classes: `validate_cases` lists them as bad data."""
    present: set[int] = set()
    for case in cases:
        present |= set(label_counts(case.labels))
    k = 1
    while k in present:
        k += 1
    return k


def validate_cases(cases: Sequence[Case], num_classes: int, rgb: bool, sparse: bool = False) -> None:
    """Raise one TrainingError listing every bad case (shape mismatch, label values beyond the classes with their
    voxel counts). `sparse`: IGNORE voxels mean "not annotated" and are no error."""
    problems = []
    for case in cases:
        spatial = case.image.shape[:-1] if rgb else case.image.shape
        if rgb and (case.image.ndim != 3 or case.image.shape[-1] != 3):
            problems.append(f"{case.name}: expected an RGB photo (Y, X, 3), got {case.image.shape}")
        elif spatial != case.labels.shape:
            problems.append(f"{case.name}: image {spatial} and labels {case.labels.shape} differ in shape")
        elif not np.issubdtype(case.labels.dtype, np.integer) and case.labels.dtype != bool:
            problems.append(f"{case.name}: labels must be integers, got {case.labels.dtype}")
        elif stray := stray_labels(case.labels[case.labels != IGNORE] if sparse else case.labels, num_classes):
            problems.append(f"{case.name}: {stray} beyond the classes 0..{num_classes - 1}")
    if problems:
        raise TrainingError(f"{len(problems)} bad training case(s): " + "; ".join(problems) +
                            " (fix the masks, or declare every class with --classes)")


def network_input(images: np.ndarray, prep: Preprocessing, size: tuple[int, int]) -> torch.Tensor:
    """(S, Y, X[, 3]) raw slices -> (S, C, H, W) float32 network input: normalised with `prep`, resized (bilinear,
    antialiased) to `size`."""
    x = torch.from_numpy(prep.apply(images))
    x = x.permute(0, 3, 1, 2) if prep.kind == "rgb" else x[:, None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Axial slices of `cases`, normalised with `prep` and resized to `size` (image bilinear, labels nearest).

    Items are ((C, H, W) float32, (H, W) int64).
    """

    def __init__(self, cases: Sequence[Case], prep: Preprocessing, size: tuple[int, int],
                 slices: dict[str, Sequence[int]] | None = None) -> None:
        images, labels = [], []
        for case in cases:
            img, lab = case.image, case.labels
            if lab.ndim == 2:
                img, lab = img[None], lab[None]
            keep = list(slices[case.name]) if slices and case.name in slices else range(len(lab))
            if not keep:
                continue
            images.append(network_input(img[keep], case.preprocessing or prep.for_image(case.image), size))
            y = torch.from_numpy(np.ascontiguousarray(lab[keep]).astype(np.int64))[:, None].float()
            labels.append(F.interpolate(y, size=size, mode="nearest")[:, 0].long())
        if not images:
            raise TrainingError("no slices to train on")
        self.images = torch.cat(images)
        self.labels = torch.cat(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def synthetic_cases(kind: str, seeds: Sequence[int]) -> list[Case]:
    """Synthetic CT volumes or skin photos, one case per seed."""
    if kind not in ("ct", "skin"):
        raise TrainingError(f"unknown synthetic data {kind!r}; use ct or skin")
    make = synthetic_ct if kind == "ct" else synthetic_skin
    return [Case(f"{kind}-{s}", (sample := make(seed=s)).image, sample.labels, sample.spacing) for s in seeds]
