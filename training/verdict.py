"""A run's progress and its verdict: the held-out slices' scores, the smallest gain they can tell from chance, and
the result in words (the dock's status, the CLI's last line). The rule is explained with its measurements in
docs/training.md#the-verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.model.checkpoint import Checkpoint
from napari_daeformer.session.agreement import Agreement

from .losses import IGNORE

RESOLUTION_Z = 2.0      # a held-out gain counts when it is this many standard errors of the per-slice gains
FEW_SLICES_GAIN = 0.02  # with fewer than 3 held-out slices their spread is unknown: only a gain this large counts
UNSHOWN_CHANGE = 0.2    # a class no corrected slice shows may differ this much (1 - Dice) from the parent's labels
MIN_CLASS_VOXELS = 100  # ... where the parent or the candidate gives it at least this many uncorrected voxels


@dataclass(frozen=True)
class FinetuneProgress:
    step: int                            # 0: the parent, scored before training
    total: int
    loss: float | None                   # None at step 0
    holdout_dice: float | None = None    # set on the steps where the held-out slices were scored


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    """What fine-tuning produced.

    `improved` is True when a trained state beat the parent on the held-out corrected slices, False when none
    did, None when nothing was held out (one corrected slice, or a recipe that holds none out). `checkpoint` is the
    model to use from now on: the best state when improved, otherwise `parent` itself, unless the parent is a new
    model (the `new_model` task: untrained, never worth keeping), when it is the candidate. `candidate` is the trained
    model offered by "keep anyway": the best-scoring trained state (the last one when nothing was held out); it is
    `checkpoint` when improved. `dice_after` and `best_step` describe the candidate; `changed_uncorrected` is the share of voxels of
    the (sampled) uncorrected slices whose label the candidate changes against the parent's prediction, None
    without uncorrected slices or when the task is `new_model` (its parent's labels mean nothing).
    """

    checkpoint: Checkpoint
    candidate: Checkpoint
    dice_before: float | None
    dice_after: float | None
    improved: bool | None
    best_step: int
    changed_uncorrected: float | None
    uncorrected_slices: int
    train_slices: int
    holdout_slices: int
    agreement: tuple[Agreement, ...] = ()   # this run's cases: proposal vs the user's labels
    calibration: str | None = None       # "CT window -125..275 HU -> 10..360 HU" when the candidate's moved
    fit: float | None = None             # Dice on the trained slices after `steps` under the full protection
    protection_share: float = 1.0        # of the protection's full weight in the steps that followed, from `fit`
    refit: bool = False                  # the candidate was trained again on every corrected slice (`FinetuneSettings.refit`)
    new_model: bool = False              # the `new_model` task: the candidate is kept
    resolution: float | None = None      # the smallest held-out gain the evidence can tell from noise (`resolvable`)
    unshown: tuple[str, ...] = ()        # classes no corrected slice shows that the candidate changes (`unshown_changes`)
    crosscheck: tuple[float | None, float | None] | None = None  # held-out Dice before, after of the run repeated
    #                                    with another slice held out (`finetune.crosschecked`); None: not repeated

    @property
    def unresolved(self) -> bool:
        """The candidate scored higher on the held-out slices, but by less than they can resolve or while changing
        classes no corrected slice shows (`unshown`)."""
        return self.improved is False and self.resolution is not None and self.dice_after is not None and \
            self.dice_before is not None and self.dice_after > self.dice_before

    @property
    def headline(self) -> str:
        """The verdict in a few words (a notification)."""
        if self.improved is None:
            return "Nothing held out: the gain is unmeasured"
        if self.improved:
            return f"Held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f}"
        if self.unresolved:
            return "No improvement you can rely on: your model is unchanged"
        return "No improvement: your model is unchanged"

    @property
    def summary(self) -> str:
        """The verdict in plain sentences, with what the candidate does to the uncorrected slices."""
        change = ("" if self.changed_uncorrected is None else
                  f"{100 * self.changed_uncorrected:.2f}% of the voxels of {self.uncorrected_slices} uncorrected slices")
        calibration = f" Input calibration: {self.calibration}." if self.calibration else ""
        if self.fit is not None and self.protection_share < 1.0:
            calibration += (f" Held to the starting model it fitted your corrections at only {self.fit:.2f}, so a "
                            f"second run was held at {100 * self.protection_share:.0f}% of the usual strength.")
        if self.refit:
            calibration += (f" Having beaten the starting model, it was trained once more on all "
                            f"{self.train_slices + self.holdout_slices} corrected slices.")
        again = "" if self.crosscheck is None else \
            f"repeated with another corrected slice held out, it scored {_pair(self.crosscheck)} there"
        if self.improved:
            text = f"{self.headline} (best at step {self.best_step}{'; ' + again if again else ''})."
            return (f"{text} It changes {change}." if change else text) + calibration
        if self.improved is None and self.new_model:
            return (f"New model trained on all {self.train_slices} annotated slice(s): none held out, so no held-out "
                    f"score. Check its proposal on slices you did not paint.{calibration}")
        if self.improved is None:
            text = f"{self.headline} ({self.train_slices} corrected slice(s), all trained on)."
            tail = f" The fine-tuned model changes {change}." if change else ""
            return f"{text}{tail}{calibration} Keep it only if its re-segmentation looks right."
        if again:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f} on the slice held "
                    f"out, but {again}: a gain that does not repeat is chance or a trade between classes; correct "
                    f"more slices for a firmer verdict")
        elif self.unresolved and self.unshown:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f}, but the "
                    f"slices you corrected show no {', '.join(self.unshown)}, which the fine-tuned model changes on the "
                    f"others; correct a slice that shows them for a verdict")
        elif self.unresolved:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f} on "
                    f"{self.holdout_slices} held-out slice(s): a gain below the {self.resolution:.3f} they can tell "
                    f"from chance; correct more slices for a firmer verdict")
        else:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f}; the best fine-tuned state scored "
                    f"{self.dice_after:.3f} at step {self.best_step}")
        return (f"{text} and would change {change})." if change else f"{text}).") + calibration


def _pair(scores: tuple[float | None, float | None]) -> str:
    return " → ".join("-" if x is None else f"{x:.3f}" for x in scores)


def slice_scores(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(n,) the mean foreground Dice of each held-out slice over its annotated voxels (the classes in either map;
    1.0 where there are none). `pred`, `truth`: (S, Y, X) stacks."""
    return np.array([_annotated_dice(p, t, num_classes) for p_stack, t_stack in zip(pred, truth)
                     for p, t in zip(p_stack, t_stack)])


def pooled_dice(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean foreground Dice over classes present in either map, each pooled over all slices."""
    return _annotated_dice(np.concatenate([p.ravel() for p in pred]), np.concatenate([t.ravel() for t in truth]),
                           num_classes)


def _annotated_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """The mean Dice over the classes in either map, on the voxels of `truth` that are annotated (1.0: none)."""
    annotated = truth != IGNORE
    scores = dice_per_class(pred[annotated], truth[annotated], num_classes)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else 1.0


def resolvable(before: np.ndarray, after: np.ndarray, min_gain: float) -> float:
    """The smallest held-out gain the evidence tells from chance: RESOLUTION_Z standard errors of the per-slice
    gains (each held-out slice one sample), at least `min_gain`; FEW_SLICES_GAIN with fewer than 3 slices."""
    if len(before) < 3:
        return max(FEW_SLICES_GAIN, min_gain)
    diff = after - before
    return max(min_gain, RESOLUTION_Z * float(np.std(diff, ddof=1)) / float(np.sqrt(len(diff))))


def unshown_changes(parent: Sequence[np.ndarray], candidate: Sequence[np.ndarray], shown: set[int],
                    num_classes: int) -> list[int]:
    """The foreground classes outside `shown` (those the corrected slices' annotations hold) whose labels the
    candidate changes on the uncorrected slices: 1 - Dice between the parent's and the candidate's masks of the class
    above UNSHOWN_CHANGE, where either gives it at least MIN_CLASS_VOXELS. No correction supports such a change and
    the held-out gain says nothing of it: trained on the first and last slice of a noisy scan (background, a little
    liver, the spine), a candidate won on the one held out and erased three organs elsewhere
    (docs/training.md#the-verdict). `parent`, `candidate`: (S, Y, X) stacks."""
    p = np.concatenate([a.ravel() for a in parent])
    c = np.concatenate([a.ravel() for a in candidate])
    unshown = []
    for k in range(1, num_classes):
        if k in shown:
            continue
        in_p, in_c = p == k, c == k
        n_p, n_c = int(in_p.sum()), int(in_c.sum())
        if max(n_p, n_c) >= MIN_CLASS_VOXELS and 1.0 - 2.0 * int((in_p & in_c).sum()) / (n_p + n_c) > UNSHOWN_CHANGE:
            unshown.append(k)
    return unshown
