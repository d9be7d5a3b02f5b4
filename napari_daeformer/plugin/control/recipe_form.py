"""What the Fine-tune dock's settings show and pass on, without Qt: the task's recipe (`settings_for`), except the
fields the user set. A field the user never touched follows the task (a new model's 3000 steps, a new class's
protection), so the dock gives the run `daeformer finetune` gives for the same request; a field the user set is
theirs until the dock closes. Also the class names a labels layer needs, with placeholders for unnamed values."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from napari_daeformer_training.losses import IGNORE
from napari_daeformer_training.pairs import Pair
from napari_daeformer_training.recipes import Overrides, settings_for
from napari_daeformer_training.settings import Task

FIELDS = ("steps", "lr", "minutes", "protect", "train_parts", "augment", "calibrate", "neighbour_weight")
NOT_FOR: dict[Task, tuple[str, ...]] = {"new_model": ("protect", "calibrate"),     # no parent to hold or calibrate to
                                        "refine": ("neighbour_weight",),          # the parent's own is kept
                                        "add_classes": ("neighbour_weight",)}


@dataclass
class RecipeForm:
    """The dock's recipe fields: which the user set (`touch`), what to show for a task, what to pass on."""

    touched: set[str] = field(default_factory=set)

    def touch(self, name: str) -> None:
        self.touched.add(name)

    def shown(self, task: Task) -> dict[str, object]:
        """The value each untouched field shows for `task`: its recipe's (minutes: 0 for no budget)."""
        recipe = settings_for(task)
        values = {name: getattr(recipe, name) for name in FIELDS if name not in self.touched}
        if "minutes" in values:
            values["minutes"] = values["minutes"] or 0.0
        return {k: v for k, v in values.items() if v is not None}

    def overrides(self, task: Task, values: dict[str, object], device: str) -> Overrides:
        """The fields the user set that apply to `task` (`values` as the controls hold them; minutes 0: none)."""
        chosen = {k: v for k, v in values.items() if k in self.touched and k not in NOT_FOR[task]}
        if "minutes" in chosen:
            chosen["minutes"] = chosen["minutes"] or None
        return Overrides(device=device, **chosen)  # type: ignore[arg-type]


def class_names_for(names: Sequence[str], labels: np.ndarray) -> list[str]:
    """`names` with a placeholder `class i` for each label value of `labels` beyond them."""
    top = int(np.max(labels)) if np.size(labels) else 0
    return [*names, *(f"class {i}" for i in range(len(names), top + 1))]


def unnamed_classes(pairs: Sequence[Pair], classes: Sequence[str], own: int) -> str | None:
    """Why the run cannot start yet when the labels hold a value nobody named (beyond `classes`, or a placeholder
    `class i` left after the model's `own` classes); None when every value has a name."""
    top = max((int(np.max(p.labels[p.labels != IGNORE], initial=0)) for p in pairs), default=0)
    placeholders = [n for n in classes[own:] if re.fullmatch(r"class \d+", n)]
    if top < len(classes) and not placeholders:
        return None
    return (f"New classes: the labels hold values up to {top}, beyond the model's {own} classes: name the new "
            f"classes (label {own} and up) in 'classes' (placeholders filled in), after the model's own, then press "
            f"Fine-tune again")
