"""What an attacker typed that once ended in a traceback, a success with nothing written, or a file no run can load:
each is now one line and status 2 before any work, and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import CheckpointError
from napari_daeformer.model.checkpoint import ModelCard, save_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing

from .conftest import TINY, official_rows


def _refused(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`main(args)` exits 2 with `message` on the last line of stderr (argparse's errors come after the usage)."""
    try:
        rc = main(args)
    except SystemExit as e:                                 # argparse: usage, then one error line
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert rc == 2 and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("option", "message"), [
    (["--input-size", "0"], "--input-size: expected 16 to 1024, a multiple of 16, got 0"),
    (["--val-every", "0"], "--val-every: expected at least 1"),
    (["--epochs", "0"], "--epochs: expected at least 1"),
    (["--lr", "nan"], "--lr: expected a number above 0"),
    (["--classes", "background,liver,,kidney"], "--classes: class names must be short printable names, got ''"),
])
def test_train_refuses_settings_no_run_can_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               option: list[str], message: str) -> None:
    _refused(["train", "--synthetic", "ct", "--out", str(tmp_path / "run"), *option], message, capsys)
    assert not (tmp_path / "run").exists()


def test_a_config_file_value_passes_the_same_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.yaml").write_text("val_every: 0\n")
    _refused(["train", "--config", str(tmp_path / "run.yaml"), "--synthetic", "ct", "--out", str(tmp_path / "run")],
             "val_every (--val-every): expected at least 1", capsys)


def test_a_typo_names_the_flag_meant(capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["segment", "a.nii.gz", "b.nii.gz", "--devce", "cpu"],
             "daeformer segment: error: unrecognized arguments: --devce (did you mean --device?) cpu", capsys)


def test_unknown_device_and_absurd_memory_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "photo.png")
    _refused(["segment", str(tmp_path / "photo.png"), str(tmp_path / "out.png"), "--device", "xla"],
             "device 'xla' is not supported", capsys)
    _refused(["--memory-limit", "1" + "0" * 400, "info", "small"], "more memory than any machine has", capsys)
    assert not (tmp_path / "out.png").exists()


def test_a_one_bit_png_is_segmented(tmp_path: Path) -> None:
    """A 1-bit PNG reads as booleans, which numpy cannot subtract: it was a TypeError traceback."""
    mask = np.zeros((48, 48), bool)
    mask[10:30, 12:40] = True
    Image.fromarray(mask).save(tmp_path / "bits.png")
    assert main(["segment", str(tmp_path / "bits.png"), str(tmp_path / "labels.png"),
                 "--device", "cpu"]) == 0
    assert np.asarray(Image.open(tmp_path / "labels.png")).shape == (48, 48)


def test_a_mask_layer_gets_the_constant_image_warning_not_a_traceback() -> None:
    """The Segment dock checks a layer with `image_warnings` before the run: np.ptp failed on a bool layer."""
    from napari_daeformer.engine.inference import image_warnings

    assert image_warnings(np.zeros((8, 8), bool)) and not image_warnings(np.eye(8, dtype=bool))


def test_import_official_refuses_names_and_weights_no_run_could_load(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=gen) for key, shape, _ in official_rows()}
    torch.save(state, tmp_path / "good.pth")
    _refused(["import-official", str(tmp_path / "good.pth"), str(tmp_path / "a.safetensors"), "--class-names",
              "background,,spleen"], "class names must be short printable names", capsys)
    state["decoder_0.concat_linear.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    _refused(["import-official", str(tmp_path / "nan.pth"), str(tmp_path / "b.safetensors")],
             "holds NaN or infinite values", capsys)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".tmp-*"))


def test_a_card_with_an_empty_class_name_cannot_be_made(tiny_model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="class names"):
        ModelCard(TINY, ("background", "", "b"), input_size=(64, 64), preprocessing=ct_preprocessing())


def test_weights_that_overflow_float16_are_not_written(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    card = ModelCard(TINY, ("background", "a", "b"), input_size=(64, 64), preprocessing=ct_preprocessing())
    with torch.no_grad():
        tiny_model.head.bias[0] = 1e6                                  # inf once stored as float16
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_checkpoint(tmp_path / "half.safetensors", tiny_model, card, dtype=torch.float16)
    assert not (tmp_path / "half.safetensors").exists()


def test_help_starts_without_torch() -> None:
    """`daeformer --help` imported torch and the trainer (3-4 s); the top level needs neither."""
    code = ("import sys; from napari_daeformer.app.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout


@pytest.mark.parametrize(("line", "message"), [
    ("window: 5", "window (--window): give LOWER,UPPER in HU or one of"),
    ("classes: 3", "classes (--classes): give the background and 1 to 255 classes"),
    ("aug: rotation_deg", "--aug 'rotation_deg': expected KEY=VALUE"),
    ("out: 123", "out (--out) expects a path, got the number 123; write it in quotes"),
])
def test_config_values_of_the_wrong_kind_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      line: str, message: str) -> None:
    (tmp_path / "run.yaml").write_text(line + "\n")
    args = ["train", "--config", str(tmp_path / "run.yaml"), "--synthetic", "ct"]
    _refused(args if line.startswith("out") else [*args, "--out", str(tmp_path / "run")], message, capsys)
    assert not (tmp_path / "run").exists() and not Path("123").exists()


def test_config_lists_and_mappings_act(tmp_path: Path) -> None:
    """`classes: [a, b]` and `aug: rotation_deg=20` are what a user writes: they act as the options would."""
    import argparse

    from napari_daeformer.app.train import augment_settings, resolve_settings

    (tmp_path / "run.yaml").write_text("classes: [background, liver]\naug: rotation_deg=20\n")
    parser = argparse.ArgumentParser()
    from napari_daeformer.app.train import add_train_arguments
    add_train_arguments(parser)
    argv = ["--config", str(tmp_path / "run.yaml")]
    args = parser.parse_args(argv)
    args.command, args.memory_limit = "train", None
    resolved = resolve_settings(parser, argv, args)
    assert resolved.classes == "background,liver"
    assert augment_settings(resolved).rotation_deg == 20.0


def test_an_empty_batch_pattern_and_too_many_classes_are_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    _refused(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--pattern", ""],
             "--pattern '': an empty pattern matches nothing", capsys)
    many = ",".join(["background", *(f"c{i}" for i in range(1000))])
    _refused(["train", "--image", "a.nii.gz", "--labels", "b.nii.gz", "--classes", many, "--out", str(tmp_path / "o")],
             "give the background and 1 to 255 classes, comma-separated (e.g. background,liver), got 1001", capsys)


def test_an_imagej_spacing_that_is_no_number_is_noted(tmp_path: Path) -> None:
    import tifffile

    from napari_daeformer.io import read_image
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint8), imagej=True,
                     metadata={"spacing": "abc", "unit": "mm"})
    record = read_image(tmp_path / "stack.tif")
    assert record.spacing == (1.0, 1.0, 1.0) and "is not positive and finite: read as 1" in record.notes[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--synthetic", "ct", "--slices", "3"], "--slices: not used with --data/--synthetic"),
    (["--image", "a.nii.gz", "--labels", "b.nii.gz", "--classes", "background,x", "--epochs", "3", "--lr", "0.1"],
     "--epochs, --lr: not used with --image (a new model from one annotated image); remove them"),
])
def test_an_option_the_run_would_ignore_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   args: list[str], message: str) -> None:
    _refused(["train", *args, "--out", str(tmp_path / "run")], message, capsys)
    assert not (tmp_path / "run").exists()
