"""Teaching something new: sparse labels carry no loss where not annotated, new classes keep the old outputs, and
a new model is trained from three annotated slices through `daeformer train --image` (small sizes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from napari_daeformer_training.losses import IGNORE, DiceCELoss
from napari_daeformer_training.recipes import TEACH
from napari_daeformer_training.teach import annotated_slices, extend_classes, intensity_window, sparse_labels

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import TrainingError
from napari_daeformer.base.jobs import drain
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.record import default_affine
from napari_daeformer.io.sample_data import synthetic_chest
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import load_checkpoint


def test_ignored_voxels_carry_no_loss_and_no_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :4] = IGNORE
    other = target.clone()
    other[:, :4] = IGNORE                                      # what is under the ignore mask does not matter
    loss = DiceCELoss()(logits, target)
    loss.backward()
    assert logits.grad is not None and logits.grad[:, :, :4].abs().max() == 0       # no gradient where ignored
    assert logits.grad[:, :, 4:].abs().max() > 0
    changed = logits.detach().clone()
    changed[:, :, :4] = 100.0                                  # any logits there: the same loss
    assert torch.allclose(DiceCELoss()(changed, other), loss.detach())
    assert DiceCELoss()(logits, torch.full_like(target, IGNORE)).item() == 0.0      # nothing annotated: no loss


def test_sparse_labels_and_annotated_slices() -> None:
    labels = np.zeros((4, 5, 5), np.int64)
    labels[1, 2, 2] = 2
    assert annotated_slices(labels).tolist() == [False, True, False, False]
    labels[[0, 2, 3]] = 99                                     # "not annotated"
    labels[3, 0, 0] = 0                                        # slice 3: one voxel said to be background
    sparse = sparse_labels(labels, 99, 3)
    assert sparse.dtype == np.uint8 and (sparse[0] == IGNORE).all()
    assert annotated_slices(sparse).tolist() == [False, True, False, True]
    with pytest.raises(TrainingError, match="is class 1"):
        sparse_labels(labels, 1, 3)
    with pytest.raises(TrainingError, match="beyond the 2 classes"):
        sparse_labels(labels, 99, 2)


def test_new_classes_keep_the_old_outputs() -> None:
    """The old classes' weights are copied bit for bit; their logits match to float rounding (the head's matrix
    product over 8 columns instead of 6 rounds differently: about 1e-6 of logits near 10) and no label changes."""
    parent = load_checkpoint(bundled_model("ct"))
    names = (*parent.card.class_names, "pancreas", "stomach")
    child = extend_classes(parent, names)
    assert child.model.cfg.num_classes == len(names) and child.card.class_names == names
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        old, new = parent.model(x), child.model(x)
    n = len(parent.card.class_names)
    assert torch.equal(child.model.head.weight[:n], parent.model.head.weight)
    assert torch.equal(child.model.head.bias[:n], parent.model.head.bias)
    assert (new[:, :n] - old).abs().max() < 1e-5
    assert (new.argmax(1) == old.argmax(1)).all() and (new[:, n:] < new[:, :1]).all()   # new classes never win
    assert child.card.class_colors[:6] == parent.card.class_colors
    with pytest.raises(TrainingError, match="must start with the model's own"):
        extend_classes(parent, ("background", "pancreas"))


def test_window_from_the_annotated_voxels_keeps_lung_apart_from_air() -> None:
    s = synthetic_chest(seed=1)
    low, high = intensity_window(s.image.astype(np.float32), s.labels)
    assert low < -850 < high and high > 200                    # lung (-850) inside; bright aorta too
    assert low > -1024 or low == -1024.0


def test_the_chest_phantom_changes_between_slices_as_a_real_chest_does() -> None:
    """Fill-between-slices must do about as badly on it as on the real chest CT of issue 30 (0.59 at 5 slices):
    the aorta is an arch on a few slices and two limbs below it, the trachea splits into two bronchi."""
    import sys

    from scipy import ndimage

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_sparse import annotated, interpolate, score

    s = synthetic_chest(seed=0)
    parts = lambda c: [ndimage.label(s.labels[z] == c)[1] for z in range(len(s.labels))]  # noqa: E731
    aorta, airway = parts(4), parts(5)
    assert 2 in aorta and aorta.index(2) > next(z for z, n in enumerate(aorta) if n)   # arch, then two limbs
    assert 2 in airway and airway.index(2) > airway.index(1)                             # trachea, then bronchi
    chosen = annotated(s.labels, 5)
    rest = np.setdiff1d(np.arange(len(s.labels)), chosen)
    assert 0.5 < score(interpolate(s.labels, chosen, 8), s.labels, rest, 8) < 0.7


def test_the_benchmark_paints_each_structure_as_a_user_who_named_it_would() -> None:
    """`bench_sparse.annotated(..., "cover")`: the nodule (on slice 4 of seed 1, between the evenly spaced slices) is
    painted in place of the nearest inner slice; the first and last stay, and every structure shows once at least."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_sparse import annotated

    s = synthetic_chest(seed=1)
    even, cover = annotated(s.labels, 5, "even"), annotated(s.labels, 5, "cover")
    nodule = np.flatnonzero((s.labels == 7).any((1, 2)))
    assert not np.isin(nodule, even).any() and np.isin(nodule, cover).any()
    assert len(cover) == 5 and cover[0] == even[0] and cover[-1] == even[-1]
    assert all((s.labels[cover] == c).any() for c in range(1, 8))


def _chest_files(tmp_path: Path, ignore: int | None = None) -> tuple[Path, Path, np.ndarray]:
    s = synthetic_chest(seed=2, shape=(12, 64, 64), spacing=(10.0, 4.8, 4.8))
    sparse = np.full(s.labels.shape, 0 if ignore is None else ignore, np.uint8)
    annotated = [2, 6, 9]
    sparse[annotated] = s.labels[annotated]
    affine = default_affine(s.spacing)
    image = write_nifti(tmp_path / "chest.nii.gz", s.image, affine)
    labels = write_nifti(tmp_path / "chest_sparse.nii.gz", sparse, affine)
    return image, labels, s.labels


def test_a_new_model_from_three_annotated_slices_through_the_cli(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    image, labels, truth = _chest_files(tmp_path, ignore=200)
    names = "background,right lung,left lung,heart,aorta,trachea,spinal cord,nodule"
    out = tmp_path / "new"
    assert main(["train", "--image", str(image), "--labels", str(labels), "--ignore-value", "200", "--classes",
                 names, "--max-steps", "20", "--minutes", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "3 annotated slices" in said.err and "CT window" in said.err and "wrote" in said.out
    ckpt = load_checkpoint(out / "best.safetensors")
    assert ckpt.card.class_names[3] == "heart" and ckpt.card.provenance["annotated_slices"] == [2, 6, 9]
    assert ckpt.card.preprocessing.window[0] < -850                     # the lungs are not clipped with the air
    assert ckpt.card.provenance["holdout_slices"] == 0 and ckpt.card.provenance["finetuned_slices"] == 3
    assert ckpt.card.neighbour_weight == TEACH.neighbour_weight > 0                # thick slices: neighbours count
    assert "nothing held out" in said.out and f"neighbours' probabilities at {TEACH.neighbour_weight:g}" in said.out
    from napari_daeformer.io import read_image
    result = SliceInferer(ckpt, device="cpu", precision="fp32").segment(read_image(image).data)
    assert result.labels.shape == truth.shape                           # and it segments the whole volume


def test_a_slice_annotated_in_part_trains_on_its_annotated_voxels(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Voxels of an annotated slice left at the ignore value (only the lungs' side painted, say) carry no loss; the
    trainer used to refuse them as label values beyond the classes."""
    s = synthetic_chest(seed=2, shape=(12, 64, 64), spacing=(10.0, 4.8, 4.8))
    sparse = np.full(s.labels.shape, 200, np.uint8)
    sparse[[2, 6, 9]] = s.labels[[2, 6, 9]]
    sparse[6, :, 32:] = 200                                    # half of a slice not annotated
    affine = default_affine(s.spacing)
    image = write_nifti(tmp_path / "chest.nii.gz", s.image, affine)
    labels = write_nifti(tmp_path / "part.nii.gz", sparse, affine)
    names = "background,right lung,left lung,heart,aorta,trachea,spinal cord,nodule"
    assert main(["train", "--image", str(image), "--labels", str(labels), "--ignore-value", "200", "--classes",
                 names, "--max-steps", "4", "--device", "cpu", "--quiet", "--neighbour-weight", "0",
                 "--out", str(tmp_path / "new")]) == 0, capsys.readouterr().err
    card = load_checkpoint(tmp_path / "new" / "best.safetensors").card
    assert card.provenance["annotated_slices"] == [2, 6, 9] and card.neighbour_weight == 0.0    # as asked


def test_a_class_painted_on_no_annotated_slice_is_named_in_a_warning(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A structure named but never painted cannot be learnt: the CLI says which (and still trains the others)."""
    image, labels, _ = _chest_files(tmp_path, ignore=200)
    names = "background,right lung,left lung,heart,aorta,trachea,spinal cord,nodule,effusion"
    assert main(["train", "--image", str(image), "--labels", str(labels), "--ignore-value", "200", "--classes",
                 names, "--max-steps", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "new")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "painted on no annotated slice: effusion." in warned[0], warned


def test_unpainted_classes_look_at_the_annotated_slices_only() -> None:
    from napari_daeformer_training.teach import teach_pair, unpainted_classes, unpainted_line

    labels = np.full((4, 6, 6), IGNORE, np.uint8)
    labels[1] = 0
    labels[1, :2] = 1
    labels[3] = 0                                              # annotated: all background
    image = np.zeros(labels.shape, np.float32)
    pair = teach_pair("v", image, labels)
    assert unpainted_classes([pair], ("background", "a", "b")) == ["b"]
    labels[2, 0, 0] = 2                                         # on a slice not chosen: still not painted
    chosen = np.array([False, True, False, True])
    assert unpainted_classes([teach_pair("v", image, labels, chosen)], ("background", "a", "b")) == ["b"]
    assert unpainted_classes([teach_pair("v", image, labels)], ("background", "a", "b")) == []
    assert unpainted_line([]) == "" and "b." in unpainted_line(["b"])


def test_a_new_model_lowers_its_loss_on_the_annotated_slices() -> None:
    """The teaching recipe on three annotated slices of the chest phantom: the loss falls (60 steps, ~20 s); under
    a 3-second budget the progress counts against the budget, not the recipe's 3000 steps."""
    from dataclasses import replace

    from napari_daeformer_training.finetune import finetune
    from napari_daeformer_training.teach import input_side, new_model, preprocessing_for, teach_pair
    from napari_daeformer_training.verdict import FinetuneProgress

    from napari_daeformer.base.jobs import drain
    from napari_daeformer.io.sample_data import CHEST_CLASSES

    s = synthetic_chest(seed=2, shape=(12, 64, 64), spacing=(10.0, 4.8, 4.8))
    sparse = np.full(s.labels.shape, IGNORE, np.uint8)
    sparse[[2, 6, 9]] = s.labels[[2, 6, 9]]
    prep, _ = preprocessing_for(s.image[[2, 6, 9]], s.labels[[2, 6, 9]], False)
    model = new_model(CHEST_CLASSES, prep, input_side((64, 64)), "small", load_checkpoint(bundled_model("ct")))
    losses: list[float] = []
    result = drain(finetune(model, [teach_pair("chest", s.image, sparse)], replace(TEACH, steps=60, device="cpu")),
                   lambda p: losses.append(p.loss) if p.loss is not None else None)
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05, losses
    assert result.changed_uncorrected is None and "uncorrected" not in result.summary   # noise, not a parent
    assert result.improved is None and result.checkpoint is result.candidate   # all 3 slices trained on, kept
    assert result.new_model and "all 3 annotated slice(s): none held out" in result.summary
    assert result.candidate.card.provenance["untrained"] is False
    progress: list[FinetuneProgress] = []
    drain(finetune(model, [teach_pair("chest", s.image, sparse)], replace(TEACH, minutes=0.05, device="cpu")),
          progress.append)
    assert TEACH.steps == 3000 and max(p.total for p in progress[1:]) < 3000   # the bar counts against the budget,
    assert progress[-1].step == progress[-1].total                             # and ends full when it is spent


def test_bad_teaching_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    image, labels, _ = _chest_files(tmp_path, ignore=200)
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((12, 64, 64), np.uint8), default_affine((10, 4.8, 4.8)))
    base = ["train", "--image", str(image), "--device", "cpu", "--quiet", "--max-steps", "2"]
    names = "background,right lung,left lung,heart,aorta,trachea,spinal cord,nodule"
    runs = [[*base, "--labels", str(empty), "--classes", "background,lung", "--out", str(tmp_path / "a")],
            [*base, "--labels", str(labels), "--ignore-value", "200", "--classes", "background,lung",
             "--out", str(tmp_path / "b")],
            [*base, "--labels", str(labels), "--ignore-value", "3", "--classes", names, "--out", str(tmp_path / "c")],
            [*base, "--labels", str(labels), "--out", str(tmp_path / "d")]]
    for argv in runs:
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err
    assert "no annotated slice" in err[0] and "beyond the 2 classes" in err[1] and "is class 3" in err[2]
    assert "needs --labels and --classes" in err[3]
    assert not any((tmp_path / d / "best.safetensors").exists() for d in "abcd")


def test_window_option_takes_a_negative_value_and_no_validation_means_no_score(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The workaround's problems: `--window -1000,1000`, --val-fraction 0 validating anyway, a batch larger than the
    slices refused, "best mean Dice 0.0000"."""
    from .test_sources import write_synapse

    write_synapse(tmp_path / "synapse", {"case0005": 1, "case0006": 2}, {"case0001": 3})
    assert main(["train", "--data", str(tmp_path / "synapse"), "--out", str(tmp_path / "o"), "--window",
                 "-1000,1000", "--val-fraction", "0", "--batch-size", "64", "--input-size", "32", "--max-steps",
                 "3", "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no validation" in err and "mean Dice" not in err
    ckpt = load_checkpoint(tmp_path / "o" / "last.safetensors")
    assert ckpt.card.preprocessing.window == (-1000.0, 1000.0)
    assert ckpt.card.provenance["val_mean_dice"] is None and ckpt.card.provenance["trained_steps"] == 3
    log = (tmp_path / "o" / "metrics.jsonl").read_text()
    assert "val_mean_dice" not in log


@pytest.mark.slow
def test_a_class_added_from_four_painted_slices_is_learnt_and_the_old_ones_kept() -> None:
    """The spine (bright bone the bundled model calls background) painted on 4 slices of the model's own proposal:
    the extended model finds it on the other slices, and the old classes stay where they were (small sizes)."""
    from napari_daeformer_training.finetune import finetune
    from napari_daeformer_training.pairs import Pair
    from napari_daeformer_training.recipes import ADD_CLASS, task_for
    from napari_daeformer_training.teach import extend_classes

    from napari_daeformer.base.metrics import dice_per_class
    from napari_daeformer.io.sample_data import CT_CLASSES, spine_mask, synthetic_ct

    parent = load_checkpoint(bundled_model("ct"))
    s = synthetic_ct(31, shape=(24, 128, 128))
    spine = spine_mask(s)
    before = SliceInferer(parent, device="cpu", precision="fp32").segment(s.image).labels
    painted = np.zeros(24, bool)
    painted[[3, 9, 15, 21]] = True
    corrected = np.where(painted[:, None, None] & spine, 6, before).astype(np.uint8)
    extended = extend_classes(parent, (*CT_CLASSES, "spine"))
    assert task_for(False, parent.card.class_names, extended.card.class_names) == "add_classes"
    assert task_for(False, parent.card.class_names, parent.card.class_names) == "refine"
    result = drain(finetune(extended, [Pair(name="spine", image=s.image, labels=corrected, slices=painted)],
                            replace(ADD_CLASS, device="cpu")))
    assert result.improved and result.checkpoint.card.provenance["added_classes"] == ["spine"]
    assert result.checkpoint.card.provenance["parent_kept"] == 1.0          # only the spine painted into the proposal:
    assert result.checkpoint.card.provenance["pseudo_confidence"] == ADD_CLASS.confidence_kept   # its unsure voxels held
    after = SliceInferer(result.checkpoint, device="cpu", precision="fp32").segment(s.image[~painted]).labels
    truth = np.where(spine, 6, s.labels)[~painted]
    assert dice_per_class(after, truth, 7)[-1] > 0.7
    old = [np.nanmean(dice_per_class(np.where(x == 6, 0, x), s.labels[~painted], 6)) for x in (before[~painted], after)]
    assert old[1] > old[0] - 0.01, old
