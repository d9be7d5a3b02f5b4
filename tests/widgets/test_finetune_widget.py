"""The fine-tune loop in a real viewer: segment with a weak model, correct slices, fine-tune, compare."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from napari_daeformer_training.recipes import ADD_CLASS, TEACH

from napari_daeformer.io.sample_data import spine_mask, synthetic_ct
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import load_checkpoint, read_card, save_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing
from napari_daeformer.plugin.widgets._layers import annotation_of
from napari_daeformer.plugin.widgets.finetune import FROM_NEW, FROM_PROPOSER, PROTECT_CHOICES, FinetuneWidget

from .conftest import from_plugins_menu

pytestmark = pytest.mark.gui


@pytest.fixture
def weak_ckpt(tmp_path: Path) -> Path:
    """The bundled CT model with the wrong CT window in its card: a realistic domain shift, Dice about 0.4."""
    ckpt = load_checkpoint(bundled_model("ct"))
    card = replace(ckpt.card, preprocessing=ct_preprocessing("bone"))
    return save_checkpoint(tmp_path / "weak.safetensors", ckpt.model, card)


@pytest.fixture
def session(make_napari_viewer, weak_ckpt: Path, qtbot) -> tuple[Any, Any, FinetuneWidget, Any]:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    sample = synthetic_ct(seed=0, shape=(24, 160, 160))
    viewer.add_image(sample.image, name="CT", scale=sample.spacing)
    segment = from_plugins_menu("segment_widget")                     # as a user does: the Plugins menu first
    segment.set_checkpoint(weak_ckpt)
    segment._image.value = viewer.layers["CT"]
    segment._run.clicked()
    qtbot.waitUntil(lambda: not segment.running, timeout=120_000)
    tune = from_plugins_menu("finetune_widget")                       # then the fine-tune dock
    assert tune.segment_widget() is segment
    return viewer, segment, tune, sample


def segment_docks(viewer: Any) -> list[str]:
    return [name for name in viewer.window.dock_widgets if name.startswith("Segment with DAE-Former")]


def _correct(layer: Any, truth: np.ndarray, slices: list[int]) -> None:
    """Write ground truth into chosen slices through the layer API, as painting would (undo history, paint event)."""
    for z in slices:
        index = np.nonzero(np.ones_like(truth[z], bool))
        layer.data_setitem((np.full(index[0].shape, z), *index), truth[z][index])


@pytest.mark.slow
def test_finetune_improves_held_out_dice(session, weak_ckpt: Path, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, segment, tune, sample = session
    original = weak_ckpt.read_bytes()
    layer = viewer.layers["CT DAE-Former"]
    _correct(layer, sample.labels, [6, 9, 12, 15, 18])
    assert tune._corrected.value is layer and tune._image.value is viewer.layers["CT"]   # the defaults: its proposal
    tune._add.clicked()
    assert "5 corrected slices" in tune._pairs_info.value
    tune._steps.value = 30
    assert "Fine-tune: 30 steps; 4 slice(s) trained on, 1 held out" in tune._status.value   # said before the run
    tune._device.value = "cpu"
    tune._run.clicked()
    qtbot.waitUntil(lambda: not tune.running, timeout=300_000)
    assert tune.control.new_path is not None and tune.control.new_path.exists(), tune._status.value
    card = read_card(tune.control.new_path)
    assert card.provenance["parent"] == str(weak_ckpt)
    assert card.provenance["holdout_dice_after"] > card.provenance["holdout_dice_before"]
    assert card.provenance["finetuned_slices"] == 4 and card.provenance["holdout_slices"] == 1
    assert weak_ckpt.read_bytes() == original                         # the parent file is untouched
    assert segment.checkpoint_path() == tune.control.new_path                 # loaded into the user's own Segment dock
    assert len(segment_docks(viewer)) == 1                            # and no other dock was made
    window = card.preprocessing.window                                # the input calibration, folded into it
    assert (segment._lower.value, segment._upper.value) == pytest.approx(window, abs=0.01)
    before = read_card(weak_ckpt).preprocessing
    assert (f"Input calibration: {before.describe()} → {card.preprocessing.describe().removeprefix('CT window ')}"
            in tune._status.value) == (window != before.window)
    assert card.provenance["crosscheck_kept"] is True and "repeated with another corrected slice held out" in \
        tune._status.value                                            # the gain on one slice repeated on another
    assert len(tune.plot.losses) == 60                                # 30 steps, and 30 more for the cross-check
    assert tune.plot.axes.get_xlim() == (0, 60) == tune.plot.dice_axes.get_xlim()   # the whole run is in view
    (first,) = card.provenance["agreement"]                           # the weak model's proposal vs the corrections
    assert first["case"] == "CT" and first["model"] == "weak.safetensors" and first["slices_changed"] == pytest.approx(5 / 24, abs=1e-4)
    assert 0 < first["dice"] < 1 and len(first["model_sha256"]) == 64
    segment._run.clicked()                                            # Run in the same dock: the new model
    qtbot.waitUntil(lambda: not segment.running, timeout=120_000)
    assert len([x for x in viewer.layers if "DAE-Former" in x.name]) == 2
    again = viewer.layers[-1]                                         # the fine-tuned model's proposal, corrected
    assert annotation_of(viewer, again).checkpoint == tune.control.new_path.name
    _correct(again, sample.labels, [6, 9, 12, 15, 18])
    tune._clear.clicked()
    tune._image.value, tune._corrected.value = viewer.layers["CT"], again
    tune._add.clicked()
    versions = tune.agreement_plot.versions                           # is the model good enough yet: one point each
    assert [v.version.split(" (")[0] for v in versions] == ["weak.safetensors", tune.control.new_path.name]
    assert versions[1].dice > versions[0].dice                        # the user kept more of the new proposal
    tune._revert.clicked()
    assert segment.checkpoint_path() == weak_ckpt


def test_good_model_is_kept_when_nothing_beats_it(make_napari_viewer, tmp_path: Path, qtbot) -> None:  # type: ignore[no-untyped-def]
    """A good model, "corrections" equal to its own prediction: no improvement, nothing saved, the Segment widget
    keeps its model; "Keep anyway" then saves the fine-tuned model and loads it."""
    viewer = make_napari_viewer()
    sample = synthetic_ct(seed=0, shape=(24, 128, 128))
    viewer.add_image(sample.image, name="CT", scale=sample.spacing)
    _, tune = viewer.window.add_plugin_dock_widget("napari-daeformer", "Fine-tune DAE-Former")
    segment = tune.segment_widget()
    good = segment.checkpoint_path()
    segment._image.value = viewer.layers["CT"]
    segment._run.clicked()
    qtbot.waitUntil(lambda: not segment.running, timeout=120_000)
    layer = viewer.layers["CT DAE-Former"]
    for z in (6, 12, 18):                                             # reviewed, found right: painted and painted back
        was = int(layer.data[z, 64, 64])
        layer.data_setitem((np.array([z]), np.array([64]), np.array([64])), (was + 1) % 6)
        layer.data_setitem((np.array([z]), np.array([64]), np.array([64])), was)
    assert np.array_equal(layer.data, annotation_of(viewer, layer).prediction)
    tune._image.value, tune._corrected.value = viewer.layers["CT"], layer
    tune._steps.value = 10
    tune._device.value = "cpu"
    kept = tmp_path / "kept.safetensors"
    tune._save_to.value = kept
    tune._run.clicked()
    qtbot.waitUntil(lambda: not tune.running, timeout=300_000)
    assert "No improvement: your model is unchanged" in tune._status.value
    assert tune.control.new_path is None and not kept.exists() and list(tmp_path.glob("*.safetensors")) == []
    assert segment.checkpoint_path() == good
    assert not tune._keep_anyway.native.isHidden() and not tune._resegment.enabled
    assert tune.plot.scored[0][0] == 0 and tune.plot.scored[0][1] > 0.99   # the parent, scored as step 0
    # (the layer may come from bf16 inference, the scoring is fp32: equal up to rounding)
    tune._keep_anyway.clicked()
    assert kept.exists() and segment.checkpoint_path() == kept and tune._resegment.enabled
    assert read_card(kept).provenance["holdout_dice_before"] > 0.99
    tune._revert.clicked()                                            # back to the bundled model, shown as such
    assert segment._model.value == "bundled CT demo (synthetic)" and segment.checkpoint_path() == good
    assert not tune._resegment.enabled and not tune._revert.enabled and "Reverted" in tune._status.value


def test_cancel_writes_nothing_and_keeps_the_model(session, weak_ckpt: Path, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer, segment, tune, sample = session
    layer = viewer.layers["CT DAE-Former"]
    _correct(layer, sample.labels, [8, 16])
    tune._image.value, tune._corrected.value = viewer.layers["CT"], layer
    tune._steps.value = 500
    tune._device.value = "cpu"
    tune._run.clicked()
    tune._worker.yielded.connect(lambda _: tune._cancel.clicked())
    qtbot.waitUntil(lambda: not tune.running, timeout=120_000)
    assert sorted(p.name for p in weak_ckpt.parent.glob("*.safetensors")) == ["weak.safetensors"]
    assert segment.checkpoint_path() == weak_ckpt and "Cancelled" in tune._status.value


def test_bad_requests_are_notifications(session, weak_ckpt: Path, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    viewer, segment, tune, sample = session
    tune._image.value, tune._corrected.value = viewer.layers["CT"], viewer.layers["CT DAE-Former"]
    tune._run.clicked()                                                # nothing corrected yet
    assert "no corrected slices" in errors[-1]
    viewer.add_labels(np.zeros((24, 80, 80), np.uint8), name="wrong shape")
    tune._corrected.value = viewer.layers["wrong shape"]
    tune._start_from.value = FROM_PROPOSER
    tune._run.clicked()
    assert "differ in shape" in errors[-1]
    beyond = np.zeros((24, 160, 160), np.uint8)
    beyond[3, 10:20, 10:20] = 9
    viewer.add_labels(beyond, name="too many classes")
    tune._corrected.value = viewer.layers["too many classes"]
    assert tune._start_from.value == FROM_NEW                          # no model proposed it: a new model by default
    tune._start_from.value = FROM_PROPOSER                             # ... or new classes on the Segment dock's
    tune._run.clicked()                                                # value 9: name it (and 6-8) first
    assert "up to 9, beyond the model&#x27;s 6 classes: name the new classes (label 6 and up)" in tune._status.value
    assert "name the new classes" not in errors[-1]                      # asked for, not reported as an error
    assert tune._class_names()[-4:] == ("class 6", "class 7", "class 8", "class 9")
    tune._classes.value = tune._classes.value.replace("liver", "<img src=x>hepar")   # renamed: the CLI refuses it
    tune._run.clicked()
    assert "'<img src=x>hepar' would rename the model's class 'liver'" in errors[-1]
    assert "&lt;img src=x&gt;hepar" in tune._status.value                # shown as text in the rich-text status
    tune._classes.value = "background, liver"                            # shorter: it used to be ignored silently
    tune._run.clicked()
    assert "the classes name 2 of the model's 6" in errors[-1]
    assert sorted(p.name for p in weak_ckpt.parent.glob("*.safetensors")) == ["weak.safetensors"]
    assert not tune.running


def test_pressing_fine_tune_with_nothing_chosen_asks_for_a_pair(make_napari_viewer, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The dock opened on an empty viewer: Fine-tune asks for an (image, labels) pair (it used to ask for new class
    names, reading "values up to 0" from no labels at all)."""
    make_napari_viewer()
    tune = from_plugins_menu("finetune_widget")
    tune._run.clicked()
    assert errors == ["DAE-Former: add at least one (image, corrected labels) pair"] and not tune.running
    assert not tune._classes.native.isVisible()


def test_paint_events_mark_slices_along_the_axis_on_screen(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    from napari_daeformer.plugin.widgets._layers import attach, corrected_slices
    from napari_daeformer.session.annotation import Annotation, ImageIdentity

    viewer = make_napari_viewer()
    prediction = np.zeros((6, 32, 32), np.uint8)
    layer = viewer.add_labels(prediction.copy())
    attach(viewer, layer, Annotation(image=ImageIdentity("k", "scan"), layer_name=layer.name, prediction=prediction.copy()))
    layer.brush_size = 3
    layer.paint((4, 10, 10), 2)                                       # napari's own brush: a masked paint atom
    layer.paint((4, 10, 10), 0)                                       # ... and painted back: equal to the model again
    assert np.array_equal(layer.data, prediction)
    assert np.flatnonzero(corrected_slices(viewer, layer)).tolist() == [4]   # still counts: the user reviewed it
    viewer.dims.order = (1, 0, 2)                                     # now viewing slices along axis 1 (coronal)
    layer.paint((2, 20, 10), 1)
    assert np.flatnonzero(corrected_slices(viewer, layer, 1)).tolist() == [20]
    assert np.flatnonzero(corrected_slices(viewer, layer, 0)).tolist() == [1, 2, 3, 4]   # painted voxels differ


def test_a_new_model_from_three_painted_slices_reaches_the_segment_dock(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    """Teach it something new from the viewer: paint the lungs on 3 slices of a chest scan no bundled model knows,
    train 'a new model', and the Segment dock runs it with the new class names."""
    from napari_daeformer.io.sample_data import synthetic_chest

    viewer = make_napari_viewer()
    sample = synthetic_chest(seed=3, shape=(12, 64, 64), spacing=(10.0, 4.8, 4.8))
    viewer.add_image(sample.image, name="chest", scale=sample.spacing)
    painted = viewer.add_labels(np.zeros(sample.labels.shape, np.uint8), name="lungs", scale=sample.spacing)
    segment = from_plugins_menu("segment_widget")
    tune = from_plugins_menu("finetune_widget")
    lungs = np.where(np.isin(sample.labels, (1, 2)), sample.labels, 0).astype(np.uint8)
    _correct(painted, lungs, [2, 6, 9])
    tune._image.value, tune._corrected.value = viewer.layers["chest"], painted
    assert tune._start_from.value == FROM_NEW                           # painted from scratch: a new model
    assert tune._run.text == "Train" and tune._minutes.value > 0 and tune._steps.value > 100   # the teaching recipe
    assert tune._neighbours.value == TEACH.neighbour_weight and not tune._neighbours.native.isHidden()
    assert all(c.native.isHidden() for c in (tune._protect, tune._calibrate, tune._overwrite))  # no parent
    tune._classes.value = "background, right lung, left lung, effusion"        # effusion: painted nowhere
    tune._steps.value, tune._device.value, tune._neighbours.value = 20, "cpu", 0.2
    tune._run.clicked()
    qtbot.waitUntil(lambda: not tune.running, timeout=180_000)
    assert "CT window" in tune._status.value or tune.control.result is not None, tune._status.value
    path = tune.control.new_path                                        # saved: a new model's start is noise
    assert "neighbouring slices" in tune._status.value and not tune._keep_anyway.visible
    assert "Painted on no annotated slice: effusion." in tune._status.value       # a class it cannot learn, named
    assert path is not None and path.exists() and path.parent != bundled_model("ct").parent
    card = read_card(path)
    assert card.class_names == ("background", "right lung", "left lung", "effusion")
    assert card.preprocessing.window[0] < -850
    assert segment.checkpoint_path() == path                            # the dock the user opened uses it
    assert card.neighbour_weight == pytest.approx(0.2)                  # the dock's neighbouring slices, in the card
    assert segment._neighbours.value == pytest.approx(0.2)
    segment._image.value = viewer.layers["chest"]
    segment._device.value = "cpu"
    segment._run.clicked()
    qtbot.waitUntil(lambda: not segment.running, timeout=120_000)
    made = viewer.layers[-1]
    assert made is not painted and made.data.shape == sample.labels.shape
    assert annotation_of(viewer, made).class_names == ("background", "right lung", "left lung", "effusion")
    assert annotation_of(viewer, made).checkpoint == path.name


@pytest.mark.slow
def test_a_class_painted_into_the_proposal_extends_the_model_from_the_dock(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    """Segment with the bundled CT model, paint the spine as label 6 on 3 slices of its proposal: Fine-tune first
    asks for the new class's name (the classes field appears), then trains a 7-class model the Segment dock uses."""
    viewer = make_napari_viewer()
    s = synthetic_ct(seed=31, shape=(12, 96, 96))
    viewer.add_image(s.image, name="CT", scale=s.spacing)
    segment = from_plugins_menu("segment_widget")
    segment._image.value, segment._device.value = viewer.layers["CT"], "cpu"
    segment._run.clicked()
    qtbot.waitUntil(lambda: not segment.running, timeout=120_000)
    proposal = viewer.layers["CT DAE-Former"]
    spine = np.where(spine_mask(s), 6, np.asarray(proposal.data)).astype(np.uint8)
    _correct(proposal, spine, [2, 6, 9])
    tune = from_plugins_menu("finetune_widget")
    tune._image.value, tune._corrected.value = viewer.layers["CT"], proposal
    tune._classes.value = "background, liver, spleen, left kidney, right kidney, aorta"     # the model's own only
    tune._steps.value, tune._device.value = 20, "cpu"
    tune._run.clicked()
    assert not tune.running and "name the new classes" in tune._status.value
    assert tune._class_names()[-1] == "class 6" and not tune._classes.native.isHidden()     # shown to the user
    assert (PROTECT_CHOICES[tune._protect.value], tune._calibrate.value, tune._steps.value) == \
        (ADD_CLASS.protect, ADD_CLASS.calibrate, 20)                     # the new-class recipe; the steps set kept
    tune._classes.value = tune._classes.value.replace("class 6", "spine")
    tune._run.clicked()
    qtbot.waitUntil(lambda: not tune.running, timeout=180_000)
    if tune.control.new_path is None:                                      # 20 steps may not beat the parent
        tune._keep_anyway.clicked()
    card = read_card(tune.control.new_path)
    assert card.class_names[-1] == "spine" and card.config.num_classes == 7
    used = card.provenance["finetune_settings"]
    assert (used["protect"], used["protect_weight"], used["calibrate"], used["steps"]) == \
        (ADD_CLASS.protect, ADD_CLASS.protect_weight, False, 20)
    import json
    from dataclasses import asdict

    from napari_daeformer_training.recipes import Overrides, settings_for
    assert used == json.loads(json.dumps(asdict(settings_for("add_classes", Overrides(steps=20, device="cpu")))))
    # the CLI builds the same run for the same request (tests/training/test_train_cli.py)
    assert segment.checkpoint_path() == tune.control.new_path
