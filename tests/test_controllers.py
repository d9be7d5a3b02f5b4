"""The docks' controllers, driven with plain arrays: no viewer, no Qt (the way napari-animation tests its model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from napari_daeformer_training.pairs import Pair

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.base.volumes import Measures
from napari_daeformer.engine.inference import Progress, SliceInferer
from napari_daeformer.io.sample_data import synthetic_ct
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import load_checkpoint, read_card
from napari_daeformer.plugin.control.finetune import FinetuneController, pair
from napari_daeformer.plugin.control.segment import SegmentController
from napari_daeformer.session.annotation import Annotation, ImageIdentity, save_session, session_path

IMAGE = ImageIdentity("k" * 32, "scan")


def _controller(path: Path) -> SegmentController:
    control = SegmentController()
    control.choose(path)
    return control


def test_model_description_and_a_missing_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    control = _controller(tiny_ckpt)
    assert control.describe() == "2 classes: a, b"
    assert control.made_by()[0] == "tiny.safetensors" and len(control.made_by()[1]) == 64
    control.choose(tmp_path / "gone.safetensors")
    assert control.describe() == "choose a checkpoint file (.safetensors)"
    with pytest.raises(DaeformerError, match="low end"):
        control.window(300, -100)


def test_a_new_run_fills_live_and_becomes_the_proposal(tiny_ckpt: Path, tmp_path: Path) -> None:
    control = _controller(tiny_ckpt)
    image = np.random.default_rng(0).normal(0, 200, (6, 64, 64)).astype(np.float32)
    run, data = control.new_run(IMAGE, "scan DAE-Former", image.shape, 0, tmp_path, control.made_by())
    assert data.shape == image.shape and data.dtype == np.uint8 and not data.any() and run.new
    live = SliceInferer(control.load(), device="cpu", precision="fp32", batch_size=2).run(image, first=3)
    first: Progress = next(live)
    while first.labels is None or not first.labels.size:
        first = next(live)
    assert run.show(data, first) and 3 in first.slices and len(first.slices) == 2
    assert np.array_equal(np.flatnonzero(data.any(axis=(1, 2))), np.sort(first.slices))      # only those slices
    result = SliceInferer(control.load(), device="cpu", precision="fp32").segment(image)
    before, after = run.finish(result)
    assert not before.any() and np.array_equal(after, result.labels)
    a = run.annotation
    assert np.array_equal(a.prediction, result.labels) and a.checkpoint == "tiny.safetensors"
    assert a.class_names == ("background", "a", "b") and not a.corrected(after).any()
    assert [m[1] for m in run.rows(Measures.of(after, (2.0, 1.0, 1.0), "nifti", a.class_names))] == ["a", "b"]
    assert run.rows(Measures.of(after, (1.0, 1.0, 1.0), "layer", a.class_names))[0][2].endswith(" voxels")


def test_a_partial_run_never_writes_a_corrected_slice(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Corrected slices (painted along axis 1 here) survive the live preview and the final merge; the proposal is
    updated only where the run wrote."""
    control = _controller(tiny_ckpt)
    image = np.random.default_rng(1).normal(0, 200, (8, 64, 64)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    annotation = Annotation(image=ImageIdentity("", ""), layer_name="painted")        # labels painted from scratch
    labels[:, 10] = 2
    annotation.touched[1] = {10}
    only = control.uncorrected(annotation, labels, image.shape, 1, "painted")
    assert only.sum() == 63 and not only[10]
    run = control.partial_run(annotation, labels, only, IMAGE, 1, tmp_path, control.made_by())
    assert annotation.image == IMAGE                                  # the run's image, fixed at its start
    result = SliceInferer(control.load(), device="cpu", precision="fp32").segment(image, axis=1, only=only)
    preview = labels.copy()
    run.show(preview, Progress(64, 64, labels=np.moveaxis(result.labels, 1, 0), slices=np.arange(64)))
    assert (preview[:, 10] == 2).all()
    before, after = run.finish(result)
    assert np.array_equal(before, labels) and (after[:, 10] == 2).all()
    assert np.array_equal(np.delete(after, 10, axis=1), np.delete(result.labels, 10, axis=1))
    assert np.array_equal(annotation.corrected(after, 1), ~only)
    with pytest.raises(DaeformerError, match="has shape"):
        control.uncorrected(annotation, labels, (8, 64, 63), 1, "painted")
    annotation.touched[1] = set(range(64))
    with pytest.raises(DaeformerError, match="nothing to re-segment"):
        control.uncorrected(annotation, after, image.shape, 1, "painted")


def test_sessions_on_offer_skip_open_ones_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.uint8)
    older = Annotation(image=IMAGE, layer_name="a", prediction=labels.copy())
    newer = Annotation(image=IMAGE, layer_name="b", prediction=labels.copy())
    labels[1] = 1
    p_old = save_session(session_path(tmp_path, older), older, labels)
    p_new = save_session(session_path(tmp_path, newer), newer, labels)
    import os
    os.utime(p_old, (1, 1))
    control = SegmentController()
    found = control.unrestored([tmp_path], IMAGE.key, [], [])
    assert found == [p_new, p_old]
    assert control.unrestored([tmp_path], IMAGE.key, [newer.id], []) == [p_old]
    offer = control.offer(found, "scan", labels.size)
    assert offer.readable and "1 corrected slice" in offer.text and "(1 more after it)" in offer.text
    saved = control.restore(offer, (4, 8, 8), labels.size)
    assert saved.annotation.id == newer.id and np.array_equal(saved.labels, labels)
    with pytest.raises(DaeformerError, match="do not fit"):
        control.restore(offer, (4, 8, 9), labels.size)
    p_new.write_bytes(b"not a zip")
    damaged = control.offer(found, "scan", labels.size)
    assert not damaged.readable and "cannot be read" in damaged.text
    assert control.offer([], "scan", 1) is None
    plain = Annotation(image=IMAGE, layer_name="c", prediction=labels.copy())       # a plain run, never corrected
    p_plain = save_session(session_path(tmp_path, plain), plain, labels)
    assert control.offer([p_plain], "scan", labels.size) is None
    assert control.offer([p_plain, p_old], "scan", labels.size).path == p_old


def test_finetune_parent_output_and_lineage(tmp_path: Path) -> None:
    """The parent is the model that proposed the labels (if its file is there); bundled models' versions go to the
    user's folder; a result that was not better is kept only on request."""
    control = FinetuneController(user_models=tmp_path / "models")
    bundled = bundled_model("ct")
    fallback = tmp_path / "dock.safetensors"
    made = Annotation(image=IMAGE, layer_name="a", checkpoint_path=str(bundled))
    assert control.parent_of(made, lambda: fallback) == bundled
    gone = Annotation(image=IMAGE, layer_name="a", checkpoint_path=str(tmp_path / "gone"))
    assert control.parent_of(gone, lambda: fallback) == fallback
    out, overwrite = control.output_path(bundled, None, False)
    assert out.parent == tmp_path / "models" and out.name.startswith("ct_small-ft") and not overwrite
    assert control.output_path(bundled, None, True) == (bundled, True)
    fallback.write_bytes(b"x")
    with pytest.raises(DaeformerError, match="already exists"):
        control.output_path(bundled, fallback, False)
    with pytest.raises(DaeformerError, match="no fine-tuned model"):
        control.keep()
    s = synthetic_ct(seed=3, shape=(4, 64, 64))
    with pytest.raises(DaeformerError, match="no corrected slices"):
        control.prepare([Pair(name="s", image=s.image, labels=s.labels, slices=np.zeros(4, bool))], bundled, None, False)


def test_a_new_model_is_announced_as_a_new_model(tmp_path: Path) -> None:
    """A new model was announced as 'fine-tuned model ... saved' and loaded as 'Fine-tuned model ... (parent:
    ct_small)': the words say which it is."""
    from napari_daeformer_training.verdict import FinetuneResult

    control = FinetuneController(user_models=tmp_path / "models")
    for new_model, saved, used in ((True, "new model saved as", "New model chest.safetensors loaded; Run"),
                                   (False, "fine-tuned model saved as", "(parent: ct_small.safetensors)")):
        result = FinetuneResult(checkpoint=None, candidate=None, dice_before=None, dice_after=None,  # type: ignore[arg-type]
                                improved=None, best_step=10, changed_uncorrected=None, uncorrected_slices=0,
                                train_slices=3, holdout_slices=0, new_model=new_model)
        control.parent_path, control.result, control.new_path = bundled_model("ct"), result, tmp_path / "chest.safetensors"
        assert saved in control.saved_note() and used in control.use_note()


def test_a_pair_learns_from_the_slices_corrected_along_the_axis_painted() -> None:
    proposal = np.zeros((3, 4, 5), np.uint8)
    labels = proposal.copy()
    labels[:, :, 2] = 1
    a = Annotation(image=IMAGE, layer_name="a", prediction=proposal, touched={0: {1}, 2: {2, 3}})
    p = pair("scan", np.zeros((3, 4, 5), np.float32), labels, a)          # painted along axis 2 the most
    assert p.slices.tolist() == [False, False, True, True, False]
    assert p.image.shape == p.labels.shape == p.proposal.shape == (5, 3, 4) and (p.labels[2] == 1).all()
    assert pair("scan", np.zeros((3, 4, 5), np.float32), labels, a, axis=0).slices.tolist() == [True, True, True]


def test_the_controllers_read_the_bundled_card() -> None:
    """A bundled checkpoint loads through the controller as the dock would load it."""
    control = _controller(bundled_model("ct"))
    assert control.load().card.class_names == read_card(bundled_model("ct")).class_names
    assert "demonstration model" in control.describe()
    assert load_checkpoint(bundled_model("ct")).card.preprocessing.kind == "ct"


def test_finetune_prepare_extends_the_head_for_new_class_names(tmp_path: Path) -> None:
    """Names after the model's own in the dock's class list: the parent gets output channels for them, so labels
    of a new class are accepted; without them the same labels are refused."""
    control = FinetuneController(user_models=tmp_path / "models")
    s = synthetic_ct(seed=3, shape=(4, 64, 64))
    labels = s.labels.copy()
    labels[1, 10:20, 10:20] = 6                                          # a structure the model does not know
    pairs = [Pair(name="s", image=s.image, labels=labels, slices=np.array([False, True, False, False]))]
    names = (*read_card(bundled_model("ct")).class_names, "pancreas")
    parent, out, _ = control.prepare(pairs, bundled_model("ct"), None, False, names)
    assert parent.card.class_names == names and parent.model.cfg.num_classes == 7
    assert out.parent == tmp_path / "models"
    with pytest.raises(DaeformerError, match="beyond the model's classes"):
        control.prepare(pairs, bundled_model("ct"), None, False)
    with pytest.raises(DaeformerError, match="beyond the model's classes"):
        control.prepare_new(pairs, ("background", "liver"), "my liver", None)
    new, where, _ = control.prepare_new(pairs, names, "my liver", None)
    assert control.chosen_intensities.startswith("CT window") and new.card.class_names == names
    assert where == tmp_path / "models" / "my_liver.safetensors"


def test_result_lines_show_hostile_names_as_text() -> None:
    from napari_daeformer.plugin.control.segment import summary_html

    text = summary_html("<img src=x onerror=alert(1)>", [("#ff0000'><b>", "<script>", "1.0 mL")])
    assert "<img" not in text and "<script>" not in text and "&lt;script&gt;" in text
    assert "color:#ff0000&#x27;&gt;&lt;b&gt;'" in text


def test_a_fine_tune_keeps_the_models_class_names() -> None:
    """The dock ignored renamed or shorter class lists silently (the CLI refuses them); placeholders and the bare
    'background' of a layer with no names rename nothing."""
    from napari_daeformer.plugin.control.finetune import check_kept_classes
    own = ("background", "liver", "spleen")
    check_kept_classes(own, own)
    check_kept_classes(own, (*own, "tumour"))
    check_kept_classes(own, ("background",))
    check_kept_classes(own, ("background", "class 1", "class 2", "class 3"))
    with pytest.raises(DaeformerError, match="'hepar' would rename the model's class 'liver'"):
        check_kept_classes(own, ("background", "hepar", "spleen", "tumour"))
    with pytest.raises(DaeformerError, match="the classes name 2 of the model's 3"):
        check_kept_classes(own, ("background", "liver"))
