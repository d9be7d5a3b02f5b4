"""`daeformer train` settings precedence and saved configuration; `daeformer evaluate` tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from napari_daeformer.app.cli import main
from napari_daeformer.model.checkpoint import load_checkpoint

from .test_sources import write_synapse


def test_config_file_then_command_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    write_synapse(tmp_path / "synapse", {"case0005": 1, "case0006": 2, "case0007": 3}, {"case0001": 4})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": str(tmp_path / "synapse"), "out": str(tmp_path / "out"),
                                      "epochs": 1, "batch-size": 4, "lr": 0.02, "input_size": 32,
                                      "val_cases": "case0007", "device": "cpu", "quiet": True}))
    assert main(["train", "--config", str(config), "--lr", "0.03", "--max-steps", "2"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["lr"] == 0.03 and saved["batch_size"] == 4 and saved["epochs"] == 1    # CLI beats the file
    ckpt = load_checkpoint(tmp_path / "out" / "last.safetensors")
    assert ckpt.card.class_names[1] == "aorta" and ckpt.card.provenance["val_cases"] == ["case0007"]
    assert ckpt.card.provenance["train_config"]["lr"] == 0.03

    assert main(["evaluate", "--model", str(tmp_path / "out" / "last.safetensors"), "--data",
                 str(tmp_path / "synapse"), "--csv", str(tmp_path / "eval.csv"), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "case0001" in table and "liver" in table and "all organs" in table
    rows = (tmp_path / "eval.csv").read_text().splitlines()
    assert rows[0] == "case,class,dice,hd95_mm" and len(rows) == 1 + 8 + 8 + 1


def test_training_errors_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "--synthetic", "ct", "--out", str(tmp_path / "o"), "--resume", "--device", "cpu",
                 "--train-seeds", "1", "--val-seeds", "2", "--batch-size", "4"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "no such data folder" in err[0] and "nothing to resume" in err[1]
    assert "unknown settings" in err[2]


def test_finetune_cli(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from napari_daeformer.io import write_labels
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine
    from napari_daeformer.io.sample_data import synthetic_ct
    from napari_daeformer.model.bundled import bundled_model
    from napari_daeformer.model.checkpoint import read_card, save_checkpoint
    from napari_daeformer.model.preprocessing import ct_preprocessing

    parent = load_checkpoint(bundled_model("ct"))
    weak = save_checkpoint(tmp_path / "weak.safetensors", parent.model,
                           replace(parent.card, preprocessing=ct_preprocessing("bone")))
    s = synthetic_ct(seed=0, shape=(16, 128, 128))
    affine = default_affine(s.spacing)
    write_nifti(tmp_path / "ct.nii.gz", s.image, affine)
    write_labels(tmp_path / "gt.nii.gz", s.labels, {"affine": affine.tolist(), "spacing": list(s.spacing),
                                                     "spatial_shape": list(s.labels.shape)})
    before = weak.read_bytes()
    args = ["finetune", "--model", str(weak), "--image", str(tmp_path / "ct.nii.gz"), "--labels",
            str(tmp_path / "gt.nii.gz"), "--slices", "4-8,11", "--steps", "20", "--device", "cpu",
            "--out", str(tmp_path / "tuned.safetensors")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Held-out Dice" in out and "4 corrected slices trained on, 2 held out" in out and "wrote" in out
    card = read_card(tmp_path / "tuned.safetensors")
    assert card.provenance["parent"] == str(weak) and weak.read_bytes() == before
    assert main(args) == 2                                               # never replaces without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_augmentation_settings_from_cli_and_file(tmp_path: Path) -> None:
    import argparse

    import pytest

    from napari_daeformer.app.train import add_train_arguments, augment_settings
    from napari_daeformer.base.errors import TrainingError

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    aug = augment_settings(parser.parse_args(["--aug", "rotation_deg=20", "--aug", "scale=0.8,1.25", "--no-flip"]))
    assert aug.rotation_deg == 20 and aug.scale == (0.8, 1.25) and aug.p_flip == 0.0 and aug.shear_deg == 16.0
    from_file = argparse.Namespace(aug={"noise_std": 0.1}, no_augment=False, no_flip=False)
    assert augment_settings(from_file).noise_std == 0.1
    assert augment_settings(parser.parse_args(["--no-augment"])) is None
    with pytest.raises(TrainingError, match="unknown augmentation setting"):
        augment_settings(parser.parse_args(["--aug", "elastic=1"]))


def test_a_missing_config_file_says_so(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "--synthetic", "ct", "--out", str(tmp_path / "out"), "--config", "small"]) == 2
    err = capsys.readouterr().err
    assert "no such settings file" in err and "--arch small" in err and err.count("\n") == 1


def test_a_stray_label_value_is_bad_data_not_a_class(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from napari_daeformer.io import write_labels
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine
    from napari_daeformer.io.sample_data import synthetic_ct

    for i in range(3):
        s = synthetic_ct(seed=i, shape=(3, 64, 64))
        labels = (s.labels > 0).astype(np.uint8) + (s.labels == 5)              # classes 0, 1, 2
        if i == 1:
            labels[1, 5, 5] = 255                                                   # one stray voxel
        geometry = {"affine": default_affine(s.spacing).tolist(), "spacing": list(s.spacing),
                    "spatial_shape": [3, 64, 64]}
        write_nifti(tmp_path / "data" / f"p{i}_image.nii.gz", s.image, default_affine(s.spacing))
        write_labels(tmp_path / "data" / f"p{i}_label.nii.gz", labels, geometry)
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--max-steps", "1", "--batch-size", "2", "--input-size", "32", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p1: label value(s) 255 (1 voxel) beyond the classes 0..2" in err
    assert not (tmp_path / "out" / "last.safetensors").exists()
    (tmp_path / "file").write_text("not a folder")
    assert main([*args[:3], "--out", str(tmp_path / "file"), *args[5:]]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_a_bad_settings_file_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """YAML syntax, a wrong type and a switch given a number: each one line naming the setting, nothing trained."""
    cases = {"syntax.yaml": ("out: [1, 2\n", "not a valid settings file"),
             "type.yaml": ("max_steps: lots\n", "max_steps (--max-steps)"),
             "switch.yaml": ("quiet: 3\n", "quiet is a switch")}
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["train", "--synthetic", "ct", "--out", str(tmp_path / "o"), "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("daeformer train: error:") and said in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_2d_label_for_a_volume_names_both_shapes(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from skimage import io as skio

    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine
    from napari_daeformer.io.sample_data import synthetic_ct

    s = synthetic_ct(seed=0, shape=(8, 64, 64))
    write_nifti(tmp_path / "ct.nii.gz", s.image, default_affine(s.spacing))
    skio.imsave(str(tmp_path / "mask.png"), s.labels[4], check_contrast=False)
    assert main(["finetune", "--model", "ct", "--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "t.safetensors"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "(64, 64) do not fit the image (8, 64, 64)" in err and not (tmp_path / "t.safetensors").exists()


def test_finetune_adding_a_class_takes_the_new_class_recipe(tmp_path: Path) -> None:
    """`daeformer finetune --classes` beyond the model's own trains with ADD_CLASS (the parent's confident labels at
    its weight, no calibration) where the options are not given, and an option given still wins."""
    from napari_daeformer_training.recipes import ADD_CLASS

    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine
    from napari_daeformer.io.sample_data import CT_CLASSES, spine_mask, synthetic_ct

    s = synthetic_ct(seed=0, shape=(6, 64, 64))
    labels = np.where(spine_mask(s), 6, s.labels).astype(np.uint8)
    write_nifti(tmp_path / "ct.nii.gz", s.image, default_affine(s.spacing))
    write_nifti(tmp_path / "lbl.nii.gz", labels, default_affine(s.spacing))
    base = ["finetune", "--model", "ct", "--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "lbl.nii.gz"),
            "--classes", ",".join((*CT_CLASSES, "spine")), "--slices", "1,4", "--device", "cpu", "--keep-anyway"]
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main([*base, "--steps", "2", "--protect", "l2sp", "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = (load_checkpoint(tmp_path / f"{n}.safetensors").card.provenance["finetune_settings"] for n in "ab")
    assert (a["protect"], a["protect_weight"], a["calibrate"], a["steps"]) == (ADD_CLASS.protect, ADD_CLASS.protect_weight,
                                                                             False, 2)
    assert (b["protect"], b["protect_weight"]) == ("l2sp", None)
    import json
    from dataclasses import asdict

    from napari_daeformer_training.recipes import Overrides, settings_for
    same = json.loads(json.dumps(asdict(settings_for("add_classes", Overrides(steps=2, device="cpu")))))
    assert a == same                 # the recipe, not the plain defaults, for every option not given (the dock: the same)
