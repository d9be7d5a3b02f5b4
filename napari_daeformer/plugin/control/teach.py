"""What the Teach dock decides, without Qt or napari: the session it starts (a new model for the named classes, or
a saved model continued), which slices get a proposal, what a proposal may be
written over, and where the model is saved. The dock (`widgets/teach.py`) shows what this returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from napari_daeformer_training.continuous import Proposal, Teaching
from napari_daeformer_training.losses import IGNORE
from napari_daeformer_training.teach import model_for, new_model_path, teach_pair, unpainted_classes, unpainted_line

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.model.checkpoint import load_checkpoint
from napari_daeformer.plugin.control.finetune import USER_MODELS

AHEAD = 2                       # slices beyond the one on screen, in the direction of travel, proposed with it


def to_propose(z: int, step: int, done: np.ndarray) -> list[int]:
    """Slice `z` and the next AHEAD along the direction of travel `step` (+1 or -1), those not painted."""
    return [k for k in (z + step * i for i in range(AHEAD + 1)) if 0 <= k < len(done) and not done[k]]


def writable(proposal: Proposal, done: np.ndarray) -> np.ndarray:
    """(n,) bool: which of `proposal`'s slices may be shown, those the user has not painted meanwhile."""
    return ~done[proposal.slices]


class TeachController:
    """One Teach dock's session and the models it saved."""

    def __init__(self, user_models: Path | None = None) -> None:
        self.user_models = user_models or USER_MODELS
        self.teaching: Teaching | None = None
        self.key: tuple[int, int] | None = None      # (image layer id, labels layer id) of the session
        self.saved: list[Path] = []
        self.intensities = ""                         # a new model's normalisation, in words

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
        self.teaching.update(labels, done)
        return self.teaching, unpainted_line(unpainted_classes([pair], tuple(start.card.class_names)))

    def save(self, name: str) -> Path:
        """The latest model as a new file NAME.safetensors (then -2, -3, ...) in the user's models folder."""
        if self.teaching is None:
            raise DaeformerError("no teaching session to save")
        self.user_models.mkdir(parents=True, exist_ok=True)
        path = self.teaching.save(new_model_path(self.user_models, name))
        self.saved.append(path)
        return path
