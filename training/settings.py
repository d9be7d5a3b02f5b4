"""The settings of one learning run (`FinetuneSettings`): what the runner (`training.finetune`) reads. The named
recipes built from them, one per task, are in `training.recipes`; the evidence for each default is in
docs/training.md (#fine-tuning-recipe)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np

from napari_daeformer.base.errors import TrainingError

Task = Literal["refine", "add_classes", "new_model"]
Protection = Literal["pseudo", "l2sp", "none"]
Parts = Literal["all", "decoder"]
PROTECTIONS: tuple[Protection, ...] = get_args(Protection)
DEFAULT_WEIGHTS: dict[Protection, float] = {"l2sp": 10.0, "pseudo": 1.0, "none": 0.0}


@dataclass(frozen=True, kw_only=True)
class FinetuneSettings:
    """One run: the task it serves, its schedule, protection, held-out selection, calibration and stages.

    The defaults are refining a model on a few corrected slices (2 CPU cores, `benchmarks/bench_finetune.py`).
    The task decides what the runner does with the parent: `refine` keeps it unless a trained state beats it;
    `add_classes` learns the classes the parent's card records as added (`teach.extend_classes`), their output
    rows free of the pull; `new_model` (`teach.new_model`) protects and compares nothing and always keeps its
    trained state.
    """

    task: Task = "refine"
    steps: int = 100
    lr: float = 3e-4                 # AdamW peak, reached after the warm-up
    warmup_steps: int = 10
    train_parts: Parts = "all"
    augment: bool = True
    batch_size: int = 2              # corrected slices per step
    protect: Protection = "l2sp"     # what keeps the uncorrected slices as they were
    protect_weight: float | None = None  # l2sp: pull strength; pseudo: weight of the CE on the parent's labels
    #                                  (None: DEFAULT_WEIGHTS for the protection)
    confidence: float = 0.9          # pseudo: parent probability above which its label is a target
    confidence_kept: float | None = None  # pseudo: the threshold where the user kept the parent's labels on the
    #                                  corrected slices (`protection.kept_dice` at least KEPT_DICE)
    trust: tuple[float, float] | None = (0.35, 0.55)  # the fit (Dice on the trained slices after `steps`, held to
    #                                  the parent) below which a second stage of `steps` starts from the parent with
    #                                  the protection eased, and at which it is gone (scaled by the square of where
    #                                  the fit lies); None: never. The best state of both is kept.
    refit: bool = True               # when the eased stage beat the parent on the one slice held out, a third stage
    #                                  trains it from the parent on every corrected slice, that one included
    crosscheck: bool = True          # a state that beat the parent on the one slice held out is kept only if the same
    #                                  run, repeated with another corrected slice held out, beats the parent there too
    protect_slices: int = 32         # uncorrected slices sampled per pair (for protection and the change measure)
    holdout_fraction: float = 0.25   # of the corrected slices, at least one from 2 corrected slices on (0: none)
    score_every: int = 10            # steps between scorings of the held-out slices
    min_gain: float = 0.001          # held-out Dice gain needed to count as better (bf16/fp32 rounding is below it)
    calibrate: bool = True           # learn a per-channel intensity scale and shift (CT and RGB; `calibration`)
    calibration_lr_scale: float = 100.0  # its learning rate, times `lr`
    new_class_lr_scale: float = 30.0  # the output layer's learning rate, times `lr`, while it has classes the parent
    #                                  never learnt (at 1x the spine stayed at Dice 0)
    device: str = "auto"
    seed: int = 0
    minutes: float | None = None     # stop cleanly after this long, the whole run (the best state so far is kept)
    neighbour_weight: float | None = None  # the new version's `ModelCard.neighbour_weight` for volumes (None: the
    #                                  parent's)

    @property
    def weight(self) -> float:
        """The protection's full weight in the loss."""
        return DEFAULT_WEIGHTS[self.protect] if self.protect_weight is None else self.protect_weight

    @property
    def adaptive(self) -> bool:
        """Whether a poor fit after the first stage starts an eased second stage."""
        return self.trust is not None and self.protect != "none" and self.task != "new_model"

    def protecting(self, protect: Protection, weight: float | None = None) -> FinetuneSettings:
        """These settings with `protect`: at `weight` where given, else at this recipe's weight where it is this
        recipe's protection, else at the protection's default."""
        kept = self.protect_weight if protect == self.protect else None
        return replace(self, protect=protect, protect_weight=kept if weight is None else weight)

    def protection_share(self, fit: float) -> float:
        """The share of the full protection for a model that fits the trained slices at Dice `fit`."""
        if self.trust is None:
            return 1.0
        low, high = self.trust
        return float(np.clip((fit - low) / (high - low), 0.0, 1.0)) ** 2

    def __post_init__(self) -> None:
        if self.protect not in PROTECTIONS:
            raise TrainingError(f"protect must be one of {', '.join(PROTECTIONS)}, got {self.protect!r}")
        if self.task not in get_args(Task):
            raise TrainingError(f"task must be one of {', '.join(get_args(Task))}, got {self.task!r}")
        if self.steps < 1 or self.batch_size < 1 or self.score_every < 1:
            raise TrainingError("steps, batch size and scoring interval must be at least 1")
