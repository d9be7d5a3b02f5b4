"""Fine-tuning on the user's corrected slices: held-out Dice before and after, a new model, the parent untouched.

Used by the "Fine-tune DAE-Former" dock widget and by `daeformer finetune`.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_daeformer.checkpoint import Checkpoint, ModelCard
from napari_daeformer.errors import TrainingError
from napari_daeformer.inference import run_segmentation, segment
from napari_daeformer.metrics import dice_per_class

from .augment import AugmentConfig
from .data import Case
from .trainer import StepReport, TrainConfig, Trainer


@dataclass(frozen=True)
class FinetuneSettings:
    """Defaults sized for a few minutes of CPU work on a handful of slices."""

    steps: int = 100
    lr: float = 1e-3                 # AdamW: gentle on a trained model
    train_parts: str = "all"         # or "decoder"
    augment: bool = True
    batch_size: int = 8
    holdout_fraction: float = 0.2    # of the corrected slices, at least one
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    """One image with its corrected labels and which slices (along axis 0) to learn from.

    Args:
        name: shown in messages.
        image: ([Z,] Y, X) or (Y, X, 3).
        labels: ([Z,] Y, X) integer.
        slices: (S,) bool, the corrected slices (a 2D image is one slice).
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    slices: np.ndarray


@dataclass(frozen=True)
class FinetuneProgress:
    step: int
    total: int
    loss: float


@dataclass
class FinetuneResult:
    checkpoint: Checkpoint           # the new model, with provenance; not yet saved
    dice_before: float
    dice_after: float
    train_slices: int
    holdout_slices: int


def check_pairs(pairs: Sequence[Pair], card: ModelCard) -> None:
    """Refuse unusable pairs with one message naming each problem."""
    problems = []
    rgb = card.preprocessing.kind == "rgb"
    if not pairs:
        raise TrainingError("add at least one (image, corrected labels) pair")
    for p in pairs:
        spatial = p.image.shape[:-1] if rgb else p.image.shape
        if rgb != (p.image.ndim == 3 and p.image.shape[-1] == 3 and p.labels.ndim == 2):
            problems.append(f"{p.name}: the model expects {'RGB photos' if rgb else 'single-channel images'}")
        elif spatial != p.labels.shape:
            problems.append(f"{p.name}: image {spatial} and labels {p.labels.shape} differ in shape")
        elif p.labels.size and p.labels.max() >= card.config.num_classes:
            problems.append(f"{p.name}: label {int(p.labels.max())} is beyond the model's classes "
                            f"0..{card.config.num_classes - 1} ({', '.join(card.class_names)})")
        elif not p.slices.any():
            problems.append(f"{p.name}: no corrected slices")
    if problems:
        raise TrainingError("; ".join(problems))


def _slices(pair: Pair, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image, labels = (pair.image[None], pair.labels[None]) if pair.labels.ndim == 2 else (pair.image, pair.labels)
    return image[index], labels[index]


def held_out_dice(checkpoint: Checkpoint, cases: Sequence[Case], rgb: bool, device: str) -> float:
    """Mean foreground Dice over the held-out slices (pooled per case)."""
    scores = []
    for case in cases:
        for image, labels in zip(case.image, case.labels):
            pred = run_segmentation(segment(image, checkpoint, rgb=rgb, device=device, precision="fp32")).labels
            scores.append(dice_per_class(pred, labels, checkpoint.card.config.num_classes))
    values = np.array(scores)
    return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0


def finetune(parent: Checkpoint, pairs: Sequence[Pair], settings: FinetuneSettings = FinetuneSettings(),
             ) -> Generator[FinetuneProgress, None, FinetuneResult]:
    """Fine-tune a copy of `parent` on the corrected slices of `pairs`; yields after every step.

    Closing the generator (a cancel) leaves `parent` exactly as it was: only the copy is trained.
    """
    card = parent.card
    check_pairs(pairs, card)
    rgb = card.preprocessing.kind == "rgb"
    rng = np.random.default_rng(settings.seed)
    train, holdout = [], []
    for p in pairs:
        chosen = np.flatnonzero(p.slices)
        n_hold = max(1, round(settings.holdout_fraction * len(chosen))) if len(chosen) > 1 else 0
        hold = rng.choice(chosen, n_hold, replace=False) if n_hold else np.array([], int)
        keep = np.setdiff1d(chosen, hold)
        train.append(Case(f"{p.name}-train", *_slices(p, keep)))
        if len(hold):
            holdout.append(Case(f"{p.name}-holdout", *_slices(p, np.sort(hold))))
    n_train = sum(len(c.labels) for c in train)
    n_hold = sum(len(c.labels) for c in holdout)
    if n_hold == 0:
        raise TrainingError("correct at least two slices: one is held out to measure whether fine-tuning helped")
    model = copy.deepcopy(parent.model).cpu()
    child = Checkpoint(model, card)
    before = held_out_dice(parent, holdout, rgb, settings.device)
    cfg = TrainConfig(epochs=10**6, batch_size=min(settings.batch_size, n_train), lr=settings.lr,
                      optimizer="adamw", weight_decay=1e-4, max_steps=settings.steps, val_every=10**6,
                      train_parts=settings.train_parts, seed=settings.seed,
                      augment=AugmentConfig(p_flip=0.0) if settings.augment else None)
    with tempfile.TemporaryDirectory(prefix="daeformer-finetune-") as tmp:
        trainer = Trainer(model, card, train, [], cfg, tmp, device=settings.device)
        for report in trainer.fit(log_every=10**9):
            if isinstance(report, StepReport):
                yield FinetuneProgress(report.step, report.total_steps, report.loss)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    after = held_out_dice(child, holdout, rgb, settings.device)
    new_card = card.with_provenance(
        parent=str(parent.path) if parent.path else None,
        finetuned_slices=n_train, holdout_slices=n_hold, finetune_settings=asdict(settings),
        holdout_dice_before=round(before, 4), holdout_dice_after=round(after, 4))
    return FinetuneResult(Checkpoint(model, new_card), before, after, n_train, n_hold)


def next_version_path(parent: str | None, folder: str | None = None) -> str:
    """`liver.safetensors` -> `liver-ft1.safetensors` (then -ft2, ...) beside it or in `folder`; never an
    existing file."""
    base = Path(parent) if parent else Path("model.safetensors")
    where = Path(folder) if folder else base.parent
    stem = base.name.removesuffix(".safetensors")
    stem = stem.rsplit("-ft", 1)[0] if "-ft" in stem and stem.rsplit("-ft", 1)[1].isdigit() else stem
    n = 1
    while (where / f"{stem}-ft{n}.safetensors").exists():
        n += 1
    return str(where / f"{stem}-ft{n}.safetensors")

