"""What the Teach dock decides, without Qt or napari: the session it starts (a new model for the named classes, or
a saved model continued), which slices get a proposal and whose it is (the model's or fill between slices',
`training.choice`), what a proposal may be written over, and where the model is saved. The dock
(`widgets/teach.py`) shows what this returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from napari_daeformer_training.choice import ProposalChoice, Source, fill_slices
from napari_daeformer_training.continuous import Proposal, Teaching
from napari_daeformer_training.losses import IGNORE
from napari_daeformer_training.teach import model_for, new_model_path, teach_pair, unpainted_classes, unpainted_line

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.model.checkpoint import load_checkpoint
from napari_daeformer.plugin.control.finetune import USER_MODELS
from napari_daeformer.session.fill import fill_in_child

AHEAD = 2                       # slices beyond the one on screen, in the direction of travel, proposed with it


def to_propose(z: int, step: int, done: np.ndarray) -> list[int]:
    """Slice `z` and the next AHEAD along the direction of travel `step` (+1 or -1), those not painted."""
    return [k for k in (z + step * i for i in range(AHEAD + 1)) if 0 <= k < len(done) and not done[k]]


def writable(proposal: Proposal, done: np.ndarray) -> np.ndarray:
    """(n,) bool: which of `proposal`'s slices may be shown, those the user has not painted meanwhile."""
    return ~done[proposal.slices]


@dataclass(frozen=True)
class Offer:
    """What some slices are offered: the model's `proposal`, fill between slices' labels there (`fill`, (n, Y, X))
    and the `source` the choice picked when it was made."""

    proposal: Proposal
    fill: np.ndarray
    source: Source

    @property
    def labels(self) -> np.ndarray:
        """(n, Y, X) the labels shown."""
        return self.fill if self.source == "fill" else self.proposal.labels


class TeachController:
    """One Teach dock's session and the models it saved."""

    def __init__(self, user_models: Path | None = None) -> None:
        self.user_models = user_models or USER_MODELS
        self.teaching: Teaching | None = None
        self.key: tuple[int, int] | None = None      # (image layer id, labels layer id) of the session
        self.saved: list[Path] = []
        self.intensities = ""                         # a new model's normalisation, in words
        self.choice = ProposalChoice()
        self.offered: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # slice -> (model's, fill's) labels shown

    def start(self, key: tuple[int, int], image: np.ndarray, labels: np.ndarray, done: np.ndarray,
              classes: Sequence[str], continue_from: Path | None, name: str) -> tuple[Teaching, str]:
        """The session for `key` (the one already running on the same layers is resumed: its model kept); a new
        one starts a new model for `classes`, or continues the model saved at `continue_from`. With the warning
        for classes painted nowhere ("" when none)."""
        image, labels = np.asarray(image), np.asarray(labels)
        if image.ndim != 3 or labels.shape != image.shape:
            raise DaeformerError(f"teaching needs a volume and a labels layer of its shape; got image {image.shape} "
                                 f"and labels {labels.shape}")
        if not done.any():
            raise DaeformerError("paint a structure on at least one slice, then start teaching")
        if self.teaching is not None and self.key == key:
            self.teaching.update(labels, done)
            return self.teaching, ""
        pair = teach_pair(name, image, np.where(done[:, None, None], labels, IGNORE), done)
        top = int(labels.max(initial=0))
        if continue_from is not None:
            start = load_checkpoint(continue_from)
            classes = start.card.class_names
            if top >= len(classes):
                raise DaeformerError(f"the labels hold value {top}; {continue_from.name} knows "
                                     f"{len(classes)} classes ({', '.join(classes)}): start a new model instead")
            self.intensities = start.card.preprocessing.describe()
        else:
            if len(classes) <= top or len(classes) < 2:
                raise DaeformerError(f"name every class, background first: the labels hold values up to {top}")
            start, self.intensities = model_for(pair, tuple(classes))
        self.teaching, self.key = Teaching(image, start, name=name), key
        self.choice, self.offered = ProposalChoice(), {}
        self.teaching.update(labels, done)
        return self.teaching, unpainted_line(unpainted_classes([pair], tuple(start.card.class_names)))

    def offer(self, teaching: Teaching, labels: np.ndarray, done: np.ndarray, slices: Sequence[int]) -> Offer:
        """The model's proposal and fill between slices' on `slices` of the (S, Y, X) `labels` painted on `done`
        (S,), with the source the choice picks now (run off the GUI thread: both take a moment; the fill in a child
        process, as ITK holds the GIL while it loads)."""
        proposal = teaching.propose(slices)
        return Offer(proposal, fill_slices(labels, done, proposal.slices, fill_in_child), self.choice.source)

    def shown(self, offer: Offer, keep: np.ndarray) -> None:
        """`offer` is on screen on its slices where `keep` (n,) bool: both proposals are kept until the user
        finishes the slice."""
        for z, model, fill in zip(offer.proposal.slices[keep], offer.proposal.labels[keep], offer.fill[keep]):
            self.offered[int(z)] = (model, fill)

    def finished(self, z: int, labels: np.ndarray) -> bool:
        """The user left slice `z` painted with (Y, X) `labels`: the proposals offered there are scored against it.
        Whether the source changed."""
        if int(z) not in self.offered:
            return False
        before = self.choice.source
        self.choice.learn(*self.offered.pop(int(z)), np.asarray(labels))
        return self.choice.source != before

    def save(self, name: str) -> Path:
        """The latest model as a new file NAME.safetensors (then -2, -3, ...) in the user's models folder."""
        if self.teaching is None:
            raise DaeformerError("no teaching session to save")
        self.user_models.mkdir(parents=True, exist_ok=True)
        path = self.teaching.save(new_model_path(self.user_models, name))
        self.saved.append(path)
        return path
