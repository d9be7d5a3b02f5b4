"""What the Fine-tune dock decides, without Qt or napari: which model to start from, where the new version goes,
the job that trains and saves it, and the lineage's state (parent, new version, a result not yet kept).
The dock (`widgets/finetune.py`) reads its controls and shows what this returns; tests drive it with arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np
from napari_daeformer_training.finetune import finetune, next_version_path
from napari_daeformer_training.pairs import Pair, check_pairs
from napari_daeformer_training.settings import FinetuneSettings
from napari_daeformer_training.teach import extend_classes, model_for, new_model_path, unpainted_classes, unpainted_line
from napari_daeformer_training.verdict import FinetuneProgress, FinetuneResult

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.model.bundled import MODELS_DIR
from napari_daeformer.model.checkpoint import Checkpoint, load_checkpoint, save_or_rescue
from napari_daeformer.session.annotation import Annotation

USER_MODELS = Path.home() / ".napari-daeformer" / "models"      # where versions of bundled models go


def finetune_and_save(parent: Checkpoint, pairs: list[Pair], settings: FinetuneSettings, out: Path,
                      overwrite: bool) -> Generator[FinetuneProgress, None, tuple[FinetuneResult, Path | None]]:
    """The new checkpoint is written only after the last step, atomically, and only when it is the model to use
    (`FinetuneResult.checkpoint`: it beat the parent on the held-out slices, or the parent is a new model): a
    cancel, a crash or no improvement writes nothing."""
    result = yield from finetune(parent, pairs, settings)
    if result.checkpoint is not result.candidate:
        return result, None
    return result, save_or_rescue(out, result.checkpoint.model, result.checkpoint.card, overwrite=overwrite)


def pair(name: str, image: np.ndarray, labels: np.ndarray, annotation: Annotation, axis: int | None = None) -> Pair:
    """A training pair from a labels layer's data and its annotation: its slices corrected along `axis` (default:
    the axis the user painted along most), that axis moved first (where `Pair` counts slices)."""
    image, labels = np.asarray(image), np.asarray(labels)
    axis = annotation.painted_axis() if axis is None else axis
    slices = annotation.corrected(labels, axis)
    proposal = annotation.prediction
    if labels.ndim == 3 and axis != 0:
        image, labels = np.moveaxis(image, axis, 0), np.moveaxis(labels, axis, 0)
        proposal = None if proposal is None else np.moveaxis(proposal, axis, 0)
    return Pair(name=name, image=image, labels=labels, slices=slices, proposal=proposal,
                proposed_by=annotation.checkpoint, proposed_by_sha256=annotation.checkpoint_sha256)


def unpainted_sentence(pairs: list[Pair], classes: tuple[str, ...], known: tuple[str, ...] = ()) -> str:
    """The warning, as a sentence, for the classes painted on no annotated slice ("" when none); `known` as in
    `unpainted_classes`."""
    line = unpainted_line(unpainted_classes(pairs, classes, known))
    return line[:1].upper() + line[1:]


def check_kept_classes(own: tuple[str, ...], typed: tuple[str, ...]) -> None:
    """Refuse (DaeformerError) class names typed for a fine-tune that rename or drop the model's own: the CLI refuses
    them too, and the dock used to ignore them silently. Placeholders ("class 3") and the bare "background" of a
    layer that has no names yet rename nothing."""
    renamed = [(t, o) for t, o in zip(typed, own) if t != o and not re.fullmatch(r"class \d+", t)]
    if renamed:
        t, o = renamed[0]
        raise DaeformerError(f"'{t}' would rename the model's class '{o}'; a fine-tuned model keeps its classes "
                             f"({', '.join(own)}) and adds new ones after them (or choose 'a new model')")
    if 1 < len(typed) < len(own):
        raise DaeformerError(f"the classes name {len(typed)} of the model's {len(own)} ({', '.join(own)}); a "
                             "fine-tuned model keeps all of them (or choose 'a new model')")


class FinetuneController:
    """One Fine-tune dock's lineage: the parent of the last run, the version it made, a result not saved."""

    def __init__(self, user_models: Path | None = None) -> None:
        self.user_models = user_models or USER_MODELS
        self.parent_path: Path | None = None
        self.new_path: Path | None = None
        self.result: FinetuneResult | None = None
        self.pending: tuple[Path, bool] | None = None           # where a result not saved would go, overwrite
        self.chosen_intensities = ""                            # what a new model's normalisation is, in words
        self.unpainted = ""                                     # new classes painted nowhere, in words

    @staticmethod
    def parent_of(annotation: Annotation | None, fallback: Callable[[], Path]) -> Path:
        """The model to fine-tune: the one that proposed the labels (when its file is still there), else
        `fallback()` (the Segment dock's)."""
        if annotation is not None and annotation.checkpoint_path and Path(annotation.checkpoint_path).is_file():
            return Path(annotation.checkpoint_path)
        return fallback()

    def output_path(self, parent: Path, chosen: Path | None, overwrite: bool) -> tuple[Path, bool]:
        """Where the new version goes, and whether it replaces a file: the parent itself (`overwrite`), a new
        `chosen` .safetensors, else PARENT-ftN.safetensors beside it (a bundled model's versions in user_models)."""
        if overwrite:
            return parent, True
        if chosen is not None and chosen.suffix == ".safetensors":
            if chosen.exists():
                raise DaeformerError(f"{chosen} already exists; choose a new name or tick 'overwrite parent'")
            return chosen, False
        bundled = parent.parent.resolve() == MODELS_DIR.resolve()
        return Path(next_version_path(str(parent), str(self.user_models) if bundled else None)), False

    def prepare(self, pairs: list[Pair], parent_path: Path, chosen: Path | None, overwrite: bool,
                classes: tuple[str, ...] = ()) -> tuple[Checkpoint, Path, bool]:
        """The parent (a fresh copy: the Segment dock's model is never touched; with `classes` longer than its own,
        its head extended for the extra ones), checked against the pairs, and where its new version goes; the previous run's
        result is dropped."""
        parent = load_checkpoint(parent_path)
        own = parent.card.class_names
        if len(classes) > len(own):
            parent = extend_classes(parent, classes)
        check_pairs(pairs, parent.card)
        out, replace = self.output_path(parent_path, chosen, overwrite)
        self.result, self.pending = None, (out, replace)
        self.unpainted = unpainted_sentence(pairs, parent.card.class_names, known=own)
        return parent, out, replace

    def prepare_new(self, pairs: list[Pair], classes: tuple[str, ...], name: str, chosen: Path | None
                    ) -> tuple[Checkpoint, Path, bool]:
        """A new model for `classes` (background first) from the annotated slices of `pairs`: intensities suited to
        what was annotated, weights started from the bundled model of the image kind; saved as NAME.safetensors in
        the user's models folder (or `chosen`)."""
        if not pairs:
            raise DaeformerError("choose the image and the labels layer you annotated")
        parent, self.chosen_intensities = model_for(pairs[0], tuple(classes))
        self.unpainted = unpainted_sentence(pairs, tuple(classes))
        check_pairs(pairs, parent.card)
        if chosen is not None and chosen.suffix == ".safetensors":
            if chosen.exists():
                raise DaeformerError(f"{chosen} already exists; choose a new name")
            out = chosen
        else:
            self.user_models.mkdir(parents=True, exist_ok=True)
            out = new_model_path(self.user_models, name)
        self.result, self.pending = None, (out, False)
        return parent, out, False

    def finished(self, parent_path: Path, result: FinetuneResult, path: Path | None) -> list[str]:
        """Record a finished run (`path`: the version saved, None when it was not better); the lines to show."""
        self.parent_path, self.result = parent_path, result
        lines = [result.summary, f"{result.train_slices} training / {result.holdout_slices} held-out slices."]
        if weight := result.candidate.card.neighbour_weight:
            lines.append(f"Each slice is segmented with its neighbours' class probabilities at {weight:g} each "
                         "(Segment dock: More settings, 'neighbouring slices').")
        if self.unpainted:
            lines.append(f"{self.unpainted}.")
        if path is None:
            lines.append("Nothing saved; the Segment widget keeps its model. Press 'Keep anyway' to use the "
                         "fine-tuned one.")
        else:
            self.new_path = path
            lines.append(f"Saved {path.name}; every open Segment dock uses it from its next Run.")
        return lines

    def keep(self) -> Path:
        """Save the last result although it was not shown better; its path."""
        if self.result is None or self.pending is None:
            raise DaeformerError("no fine-tuned model to keep")
        out, overwrite = self.pending
        self.new_path = save_or_rescue(out, self.result.candidate.model, self.result.candidate.card,
                                        overwrite=overwrite)
        return self.new_path

    def use_note(self) -> str:
        """What the Segment docks say once they use the new version."""
        assert self.new_path is not None
        if self.result is not None and self.result.new_model:
            return f"New model {self.new_path.name} loaded; Run uses it."
        parent = self.parent_path.name if self.parent_path else "unknown"
        return f"Fine-tuned model {self.new_path.name} loaded (parent: {parent}); Run uses it."

    def saved_note(self) -> str:
        """The notification once a version is saved: a new model or a fine-tuned one, and where."""
        assert self.new_path is not None
        kind = "new model" if self.result is not None and self.result.new_model else "fine-tuned model"
        return f"DAE-Former: {kind} saved as {self.new_path}"
