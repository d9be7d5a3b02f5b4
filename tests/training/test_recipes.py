"""The learning tasks' recipes, pinned field by field, and the one function every front end builds a run with:
a change to a recipe is a decision made here, on purpose, with the benchmark tables rerun."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
from napari_daeformer_training.pairs import holdout_count
from napari_daeformer_training.recipes import RECIPES, Overrides, describe, settings_for, task_for

COMMON = {"confidence": 0.9, "trust": (0.35, 0.55), "refit": True, "crosscheck": True, "protect_slices": 32,
          "holdout_fraction": 0.25,
          "min_gain": 0.001, "calibration_lr_scale": 100.0, "new_class_lr_scale": 30.0, "device": "auto", "seed": 0,
          "train_parts": "all", "augment": True}
PINNED = {
    "refine": {**COMMON, "task": "refine", "steps": 100, "lr": 3e-4, "warmup_steps": 10, "batch_size": 2, "protect": "l2sp",
               "protect_weight": None, "confidence_kept": None, "score_every": 10,
               "calibrate": True, "minutes": None, "neighbour_weight": None},
    "add_classes": {**COMMON, "task": "add_classes", "steps": 200, "lr": 3e-4, "warmup_steps": 10, "batch_size": 2, "protect": "pseudo",
                    "protect_weight": 10.0, "confidence_kept": 0.7, "score_every": 10,
                    "calibrate": False, "minutes": None, "neighbour_weight": None, "crosscheck": False},
    "new_model": {**COMMON, "task": "new_model", "steps": 3000, "lr": 6e-4, "warmup_steps": 20, "batch_size": 4, "protect": "none",
                  "protect_weight": None, "confidence_kept": None, "score_every": 10,
                  "holdout_fraction": 0.0,
                  "calibrate": False, "minutes": 5.0, "neighbour_weight": 0.3},
}


@pytest.mark.parametrize("task", sorted(PINNED))
def test_each_recipe_is_pinned(task: str) -> None:
    assert asdict(RECIPES[task]) == PINNED[task]            # type: ignore[index]
    assert asdict(settings_for(task)) == PINNED[task]       # type: ignore[arg-type]


def test_the_task_comes_from_what_was_asked() -> None:
    own = ("background", "liver")
    assert task_for(True, own, own) == "new_model"
    assert task_for(False, own, (*own, "tumour")) == "add_classes"
    assert task_for(False, own, own) == task_for(False, own) == "refine"


def test_overrides_change_only_what_was_set() -> None:
    """An option given wins; the recipe keeps the rest (the CLI used to reset an add-class run's learning rate,
    warm-up, trained parts and augmentation to the plain defaults)."""
    s = settings_for("add_classes", Overrides(steps=20, device="cpu"))
    assert asdict(s) == {**PINNED["add_classes"], "steps": 20, "device": "cpu"}
    assert (settings_for("add_classes", Overrides(protect="pseudo")).protect_weight, ) == (10.0, )   # the recipe's
    assert settings_for("add_classes", Overrides(protect="l2sp")).protect_weight is None             # l2sp's default
    assert settings_for("refine", Overrides(protect_weight=3.0)).weight == 3.0


@pytest.mark.parametrize(("task", "slices", "held"), [
    ("refine", 1, 0), ("refine", 2, 1), ("refine", 4, 1), ("refine", 8, 2), ("refine", 10, 2), ("refine", 11, 3),
    ("refine", 1000, 16), ("new_model", 5, 0), ("new_model", 8, 0), ("new_model", 40, 0)])
def test_a_run_is_described_before_it_starts(task: str, slices: int, held: int) -> None:
    settings = settings_for(task)                           # type: ignore[arg-type]
    assert holdout_count(settings, slices) == held
    text = describe(settings, slices)
    assert f"{settings.steps} steps" in text
    assert (f"{slices - held} slice(s) trained on, {held} held out" if held else f"all {slices} slice(s) trained on") \
        in text
    assert ("repeated holding out another corrected slice" in text) == (held == 1)


def test_the_description_matches_the_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What `describe` says of the slices is what the run does (a refine run on 5 corrected slices of a phantom)."""
    import numpy as np
    from napari_daeformer_training.finetune import finetune
    from napari_daeformer_training.pairs import Pair

    from napari_daeformer.base.jobs import drain
    from napari_daeformer.io.sample_data import synthetic_ct
    from napari_daeformer.model.bundled import bundled_model
    from napari_daeformer.model.checkpoint import load_checkpoint

    s = synthetic_ct(seed=5, shape=(10, 64, 64))
    chosen = np.zeros(10, bool)
    chosen[[1, 3, 5, 7, 9]] = True
    settings = settings_for("refine", Overrides(steps=2, device="cpu"))
    result = drain(finetune(load_checkpoint(bundled_model("ct")), [Pair(name="ct", image=s.image, labels=s.labels, slices=chosen)],
                            settings))
    held = holdout_count(settings, 5)
    assert (result.train_slices, result.holdout_slices) == (5 - held, held)
    assert f"{5 - held} slice(s) trained on, {held} held out" in describe(settings, 5)


def test_a_verdict_needs_a_gain_the_held_out_slices_resolve() -> None:
    """A good model corrected on 2 or 4 slices 'gained' 0.008 / 0.005 on its one held-out slice and was saved, worse
    on the slices not corrected: below 3 held-out slices only a gain of FEW_SLICES_GAIN counts; from 3 on, twice
    the standard error of the per-slice gains."""
    import numpy as np
    from napari_daeformer_training.verdict import FEW_SLICES_GAIN, resolvable

    assert resolvable(np.array([0.896]), np.array([0.904]), 0.001) == FEW_SLICES_GAIN > 0.008
    steady = resolvable(np.array([0.5, 0.6, 0.55, 0.52]), np.array([0.9, 0.95, 0.93, 0.91]), 0.001)
    assert steady < 0.05                                           # a scanner shift undone on every slice
    mixed = resolvable(np.array([0.90, 0.95, 0.93]), np.array([0.93, 0.91, 0.96]), 0.001)
    assert mixed > (0.93 + 0.91 + 0.96 - 0.90 - 0.95 - 0.93) / 3    # +0.007 on average: within the spread


def test_the_words_say_when_a_gain_is_too_small_to_tell() -> None:
    from napari_daeformer_training.verdict import FinetuneResult

    common = dict(checkpoint=None, candidate=None, uncorrected_slices=46, train_slices=1, holdout_slices=1,
                  resolution=0.02)
    result = FinetuneResult(dice_before=0.896, dice_after=0.904, improved=False, best_step=40,  # type: ignore[arg-type]
                            changed_uncorrected=0.003, **common)
    assert result.headline == "No improvement you can rely on: your model is unchanged"
    assert "0.896 → 0.904 on 1 held-out slice(s): a gain below the 0.020 they can tell from chance" in result.summary
    worse = FinetuneResult(dice_before=0.9, dice_after=0.85, improved=False, best_step=0,  # type: ignore[arg-type]
                           changed_uncorrected=None, **common)
    assert worse.headline == "No improvement: your model is unchanged"


def test_a_gain_on_held_out_slices_says_nothing_of_classes_no_correction_shows() -> None:
    """Trained on the first and last slice of a noisy scan (background, a little liver, the spine), a candidate won
    on the one held out and erased the spleen and kidneys elsewhere: classes no corrected slice shows that the
    candidate changes block the verdict, whatever the held-out gain; small changes and tiny classes do not."""
    import numpy as np
    from napari_daeformer_training.verdict import MIN_CLASS_VOXELS, unshown_changes

    parent = np.zeros((4, 32, 32), np.uint8)
    parent[:, 2:12, 2:12] = 1                       # liver: 400 voxels
    parent[:, 20:30, 20:30] = 2                     # spleen: 400 voxels
    parent[0, 0, 0] = 3                             # a speck of kidney
    erased = np.where(parent == 2, 0, parent)
    assert unshown_changes([parent], [erased], {1}, 4) == [2]
    assert unshown_changes([parent], [erased], {1, 2}, 4) == []        # shown: the corrections taught it
    nudged = parent.copy()
    nudged[:, 20, 20:30] = 0                        # a tenth of the spleen: within UNSHOWN_CHANGE
    assert unshown_changes([parent], [nudged], {1}, 4) == []
    grown = parent.copy()
    grown[:, 12:20, 12:20] = 3                      # a kidney where the parent saw none
    assert 4 * 64 >= MIN_CLASS_VOXELS and unshown_changes([parent], [grown], {1, 2}, 4) == [3]


def test_the_words_name_the_classes_no_correction_shows() -> None:
    from napari_daeformer_training.verdict import FinetuneResult

    result = FinetuneResult(checkpoint=None, candidate=None, dice_before=0.19, dice_after=0.48,  # type: ignore[arg-type]
                            improved=False, best_step=300, changed_uncorrected=0.23, uncorrected_slices=32,
                            train_slices=1, holdout_slices=1, resolution=0.02, unshown=("spleen", "left kidney"))
    assert result.headline == "No improvement you can rely on: your model is unchanged"
    assert "slices you corrected show no spleen, left kidney, which the fine-tuned model changes" in result.summary
    assert "correct a slice that shows them" in result.summary


def test_a_gain_on_one_held_out_slice_is_kept_only_if_it_repeats() -> None:
    """The lesion scan corrected on 2 slices (seed 31): +0.034 on the one held out, 0.004 worse on the other 46; the
    run repeated with the other slice held out did not gain there, so the parent is kept and the words say why."""
    import torch
    from napari_daeformer_training.finetune import crosschecked
    from napari_daeformer_training.verdict import FinetuneResult

    from napari_daeformer.model.checkpoint import Checkpoint, ModelCard
    from napari_daeformer.model.config import named_config

    card = ModelCard(config=named_config("small", num_classes=2, in_channels=1), class_names=("background", "lesion"))
    parent, candidate = Checkpoint(torch.nn.Identity(), card), Checkpoint(torch.nn.Identity(), card)
    common = dict(candidate=candidate, uncorrected_slices=46, train_slices=1, holdout_slices=1, resolution=0.02,
                  changed_uncorrected=0.0013, best_step=50)
    first = FinetuneResult(checkpoint=candidate, dice_before=0.913, dice_after=0.947, improved=True, **common)
    refused = crosschecked(first, replace(first, dice_before=0.95, dice_after=0.951, improved=False), parent)
    assert refused.checkpoint is parent and refused.improved is False and refused.crosscheck == (0.95, 0.951)
    assert refused.headline == "No improvement you can rely on: your model is unchanged"
    assert "0.913 → 0.947 on the slice held out, but repeated with another corrected slice held out, it scored " \
        "0.950 → 0.951 there" in refused.summary
    assert refused.candidate.card.provenance["crosscheck_kept"] is False
    kept = crosschecked(first, replace(first, dice_before=0.90, dice_after=0.95), parent)
    assert kept.improved and kept.checkpoint is kept.candidate and kept.checkpoint.card.provenance["crosscheck_kept"]
    assert "Held-out Dice 0.913 → 0.947 (best at step 50; repeated with another corrected slice held out, it " \
        "scored 0.900 → 0.950 there)" in kept.summary
