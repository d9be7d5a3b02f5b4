"""What a learning run learns from: the user's (image, corrected labels) pairs, their checks, and the split into
slices trained on, slices held out and scored, and uncorrected slices sampled for protection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.io.record import is_rgb
from napari_daeformer.model.checkpoint import ModelCard
from napari_daeformer.model.preprocessing import Preprocessing
from napari_daeformer.session.agreement import Agreement, measure

from .data import Case, stray_labels
from .losses import IGNORE
from .settings import FinetuneSettings

MAX_HOLDOUT = 16      # held-out slices at most: scoring them is inside the time budget (10000 slices held out 2500)


@dataclass(frozen=True, kw_only=True)
class Pair:
    """One image with its corrected labels and which slices (along axis 0) to learn from.

    Args:
        name: shown in messages.
        image: ([Z,] Y, X) or (Y, X, 3).
        labels: ([Z,] Y, X) integer.
        slices: (S,) bool, the corrected slices (a 2D image is one slice).
        proposal: the model's own labels before the user corrected them, when known: its agreement with `labels`
            is recorded per model version (`napari_daeformer.session.agreement`).
        proposed_by, proposed_by_sha256: the checkpoint (file name, hash) that made `proposal`.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    slices: np.ndarray
    proposal: np.ndarray | None = None
    proposed_by: str = ""
    proposed_by_sha256: str = ""


@dataclass(frozen=True)
class Slices:
    """Slices of one pair as the engine sees them: raw, with their normalisation, and a target at source size."""

    images: np.ndarray               # (S, Y, X[, 3]) raw slices
    prep: Preprocessing              # the parent's normalisation of their image
    labels: np.ndarray               # (S, Y, X) the user's labels, or the parent's prediction


@dataclass(frozen=True, kw_only=True)
class Split:
    """The slices of a run: trained on (as training cases), held out and scored, and uncorrected (sampled)."""

    train: list[Case]
    holdout: list[Slices]
    uncorrected: list[tuple[np.ndarray, Preprocessing]]     # (S, Y, X[, 3]) images, their normalisation
    held: frozenset[tuple[int, int]] = frozenset()            # (pair, slice) of each held-out slice

    @property
    def trained(self) -> list[Slices]:
        """The training cases as (S, Y, X[, 3]) slices, with the user's labels."""
        return [Slices(c.image[None], c.preprocessing, c.labels[None]) if c.labels.ndim == 2
                else Slices(c.image, c.preprocessing, c.labels) for c in self.train]

    @property
    def train_slices(self) -> int:
        return sum(1 if c.labels.ndim == 2 else len(c.labels) for c in self.train)   # a photo is one slice

    @property
    def holdout_slices(self) -> int:
        return sum(len(h.labels) for h in self.holdout)


def as_slices(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(S, Y, X[, 3]) images and (S, Y, X) labels; a 2D pair is one slice."""
    return (pair.image[None], pair.labels[None]) if pair.labels.ndim == 2 else (pair.image, pair.labels)


def require_pairs(pairs: Sequence[Pair]) -> None:
    """Refuse an empty list of pairs."""
    if not pairs:
        raise TrainingError("add at least one (image, corrected labels) pair")


def check_pairs(pairs: Sequence[Pair], card: ModelCard) -> None:
    """Refuse unusable pairs with one message naming each problem."""
    problems = []
    rgb = card.preprocessing.kind == "rgb"
    require_pairs(pairs)
    for p in pairs:
        spatial = p.image.shape[:-1] if rgb else p.image.shape
        if rgb != is_rgb(p.image, p.labels):
            problems.append(f"{p.name}: the model expects {'RGB photos' if rgb else 'single-channel images'}")
        elif spatial != p.labels.shape:
            problems.append(f"{p.name}: image {spatial} and labels {p.labels.shape} differ in shape")
        elif stray := stray_labels(p.labels[p.labels != IGNORE], card.config.num_classes):
            problems.append(f"{p.name}: {stray} beyond the model's classes 0..{card.config.num_classes - 1} "
                            f"({', '.join(card.class_names)})")
        elif not p.slices.any():
            problems.append(f"{p.name}: no corrected slices")
        elif empty := [int(j) for j in np.flatnonzero(p.slices) if (as_slices(p)[1][j] == IGNORE).all()]:
            problems.append(f"{p.name}: slice(s) {', '.join(map(str, empty[:10]))} chosen to learn from hold no "
                            "annotated voxel (all 'not annotated')")
    if problems:
        raise TrainingError("; ".join(problems))


def pair_agreement(pairs: Sequence[Pair], num_classes: int) -> list[Agreement]:
    """How much of the model's proposal the user kept, for each pair that carries its proposal."""
    return [measure(p.name, p.proposed_by or "unknown model", p.proposed_by_sha256, p.proposal, p.labels, num_classes)
            for p in pairs if p.proposal is not None and p.proposal.shape == p.labels.shape]


def holdout_count(settings: FinetuneSettings, slices: int) -> int:
    """How many of `slices` corrected slices a run holds out and scores (the rest it trains on)."""
    if slices < 2 or not settings.holdout_fraction:
        return 0
    return min(MAX_HOLDOUT, max(1, round(settings.holdout_fraction * slices)))


def split(pairs: Sequence[Pair], settings: FinetuneSettings, rng: np.random.Generator, prep: Preprocessing,
          first_new: int | None = None, avoid: frozenset[tuple[int, int]] = frozenset()) -> Split:
    """The run's slices, each pair with `prep` measured on its whole image (z-score). The held-out share
    (`holdout_count`) is taken from the corrected slices of all pairs together (photos are one slice each): those
    that show the most classes, ties drawn at random, so the verdict is drawn where the structures are (held out at
    random, the first or last slice of a scan, a sliver of liver and the spine, vouched for a fine-tune that was
    worse on the slices between; docs/training.md#the-verdict). With classes new to the head (from `first_new` on)
    they are drawn from the slices holding at least a quarter of the most any slice holds of them: against a sliver
    of the new class the parent, scored on its own labels, cannot be beaten (docs/training.md#a-class-added). Up to
    `protect_slices` evenly spaced uncorrected slices are sampled per pair. The (pair, slice) keys in `avoid` are
    trained on, never held out (a cross-check holds out another slice)."""
    corrected = [(i, int(j)) for i, p in enumerate(pairs) for j in np.flatnonzero(p.slices)]
    n_hold = holdout_count(settings, len(corrected))
    chosen = [c for c in corrected if c not in avoid]
    n_hold = min(n_hold, len(chosen))
    stacks = [as_slices(p)[1] for p in pairs]
    held: set[tuple[int, int]] = set()
    if n_hold and first_new is not None:
        amount = np.array([np.count_nonzero((stacks[i][j] >= first_new) & (stacks[i][j] != IGNORE)) for i, j in chosen])
        pool = [c for c, a in zip(chosen, amount) if a >= amount.max() / 4] if amount.max() > 0 else chosen
        pool = pool if len(pool) >= n_hold else chosen
        held = {pool[k] for k in rng.choice(len(pool), n_hold, replace=False)}
    elif n_hold:                                        # the slices that show the most classes, ties at random
        shown = [len(np.setdiff1d(stacks[i][j], (0, IGNORE))) for i, j in chosen]
        held = {chosen[k] for k in sorted(rng.permutation(len(chosen)), key=lambda k: -shown[k])[:n_hold]}
    train, holdout, uncorrected = [], [], []
    for i, p in enumerate(pairs):
        images, labels = as_slices(p)
        fitted = prep.for_image(p.image)
        keep = [j for j in np.flatnonzero(p.slices) if (i, j) not in held]
        hold = sorted(j for j in np.flatnonzero(p.slices) if (i, j) in held)
        if keep:
            flat = p.labels.ndim == 2                                    # a photo or a 2D image: one slice
            train.append(Case(f"{p.name}-train", p.image if flat else images[keep], p.labels if flat else labels[keep],
                              preprocessing=fitted))
        if hold:
            holdout.append(Slices(images[hold], fitted, labels[hold]))
        rest = np.flatnonzero(~p.slices)
        if len(rest):
            pick = np.linspace(0, len(rest) - 1, min(len(rest), settings.protect_slices)).round().astype(int)
            uncorrected.append((images[rest[np.unique(pick)]], fitted))
    return Split(train=train, holdout=holdout, uncorrected=uncorrected, held=frozenset(held))
