"""The learning tasks and their recipes, as data, and the one function that turns a task and what the user set
into a run's settings. The CLI (`daeformer finetune`, `daeformer train --image`), the Fine-tune dock's controller
and the benchmarks all call `settings_for`, so the same input gives the same run whichever front end starts it.

A task is chosen from what the user asked for (a new model, or a model to refine, with or without classes beyond
its own), never from a checkpoint's provenance; `describe` says before the run how many steps run on which slices
and what is kept. The evidence for each recipe's values is in docs/training.md (`#fine-tuning-recipe`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .pairs import holdout_count
from .settings import FinetuneSettings, Parts, Protection, Task

# Refining a model on its corrected slices: the settings' defaults (docs/training.md#fine-tuning-recipe).
REFINE = FinetuneSettings()
# Classes added to the head: the parent's confident labels held on the uncorrected slices at 10x weight (at 0.7
# where the user kept its labels), twice the steps, no input calibration, no cross-check (measured on refining
# only; docs/training.md#a-class-added).
ADD_CLASS = FinetuneSettings(task="add_classes", steps=200, protect="pseudo", protect_weight=10.0,
                             confidence_kept=0.7, calibrate=False, crosscheck=False)
# A new model from a few annotated slices: nothing to protect, stopped by the time budget, every annotated slice
# trained on and none held out (a new model is kept whatever it scores; holding 2 of 8 out to pick a state made 8
# slices worse than 5), each slice segmented with its neighbours' probabilities
# (docs/training.md#a-new-structure-from-a-few-annotated-slices).
TEACH = FinetuneSettings(task="new_model", steps=3000, lr=6e-4, warmup_steps=20, protect="none", calibrate=False,
                         batch_size=4, minutes=5.0, holdout_fraction=0.0, neighbour_weight=0.3)
# One round of teaching while the user paints (`training.continuous`): the new-model task in short runs, each from
# the last round's model, so a slice painted a moment ago joins at the next round; a short warm-up, as each round
# starts its optimiser afresh (docs/annotate.md#teach-while-you-paint).
TEACH_ROUND = replace(TEACH, steps=20, warmup_steps=2, minutes=None)
RECIPES: dict[Task, FinetuneSettings] = {"refine": REFINE, "add_classes": ADD_CLASS, "new_model": TEACH}
TASK_WORDS: dict[Task, str] = {"refine": "fine-tune", "add_classes": "fine-tune with new classes",
                               "new_model": "a new model"}


def task_for(new_model: bool, own_classes: tuple[str, ...] = (), classes: tuple[str, ...] = ()) -> Task:
    """A new model when asked for; else refining the parent, adding classes when `classes` goes beyond its own."""
    if new_model:
        return "new_model"
    return "add_classes" if len(classes) > len(own_classes) else "refine"


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """What the user set on top of the task's recipe; None keeps the recipe's value."""

    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    protect: Protection | None = None
    protect_weight: float | None = None
    train_parts: Parts | None = None
    augment: bool | None = None
    calibrate: bool | None = None
    minutes: float | None = None
    device: str | None = None
    seed: int | None = None
    neighbour_weight: float | None = None


def settings_for(task: Task, overrides: Overrides = Overrides()) -> FinetuneSettings:
    """The task's recipe with the user's overrides: a protection given without a weight takes the recipe's weight
    where it is the recipe's protection, else that protection's default."""
    base = RECIPES[task]
    if overrides.protect is not None or overrides.protect_weight is not None:
        base = base.protecting(overrides.protect or base.protect, overrides.protect_weight)
    changes = {k: v for k, v in asdict(overrides).items() if v is not None and k not in ("protect", "protect_weight")}
    return replace(base, **changes)


def describe(settings: FinetuneSettings, slices: int) -> str:
    """The run in words, before it starts: steps, slices trained and held out, and what is kept."""
    held = holdout_count(settings, slices)
    budget = f", stopped after {settings.minutes:.2g} min" if settings.minutes else ""
    where = (f"{slices - held} slice(s) trained on, {held} held out (those showing the most classes) and scored "
             f"every {settings.score_every} steps" if held else f"all {slices} slice(s) trained on, none held out")
    task = settings.task
    if task == "new_model":
        kept = "the best-scoring state is kept" if held else "the last state is kept (no held-out score)"
        return f"A new model: up to {settings.steps} steps{budget}; {where}; {kept}."
    again = (" If it then fits your corrections poorly, as many steps again from the starting model with its hold "
             "eased" if settings.trust is not None and settings.protect != "none" else "")
    if again and held == 1 and settings.refit:
        again += ", and where that beats the starting model, once more on every corrected slice"
    again += "." if again else ""
    if held == 1 and settings.crosscheck:
        again += (" A gain on the one held-out slice is cross-checked: the run is repeated holding out another "
                  "corrected slice, and kept only if it beats the starting model there too.")
    kept = ("a trained state is kept only if it beats the starting model on the held-out slices and leaves alone "
            "the classes your corrections do not show" if held else
            "nothing can be scored, so the result is offered, not chosen")
    return f"{TASK_WORDS[task].capitalize()}: {settings.steps} steps{budget}; {where}; {kept}.{again}"
