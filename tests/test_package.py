"""Packaging: the manifest validates, the core imports without Qt, the CLI answers."""

from __future__ import annotations

import subprocess
import sys

from napari_daeformer.cli import main


def test_npe2_manifest_validates() -> None:
    result = subprocess.run(["npe2", "validate", "napari-daeformer"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_core_imports_without_qt_or_napari() -> None:
    code = ("import sys, napari_daeformer, napari_daeformer.model, napari_daeformer.checkpoint, "
            "napari_daeformer.io, napari_daeformer.official, napari_daeformer.cli, napari_daeformer.sample_data, "
            "napari_daeformer._reader, napari_daeformer._writer, napari_daeformer._samples; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PySide2', 'PySide6', 'napari', "
            "'magicgui', 'superqt')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_help_and_one_line_errors(capsys) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(["daeformer", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "import-official" in result.stdout
    assert main(["info", "missing.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daeformer info: error: ") and err.count("\n") == 1


def test_cli_info_prints_paper_parameter_count(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "paper", "--in-channels", "3"]) == 0
    assert "29.69 M" in capsys.readouterr().out


def test_core_never_imports_training() -> None:
    """Import direction: widgets/cli -> training -> core. The core modules load without `training`."""
    code = ("import sys, napari_daeformer.inference, napari_daeformer.io, napari_daeformer.checkpoint, "
            "napari_daeformer.metrics, napari_daeformer.official, napari_daeformer.corrections, "
            "napari_daeformer._reader, napari_daeformer._writer, napari_daeformer._samples, training.trainer; "
            "import napari_daeformer.inference as core; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'napari', 'magicgui')]; "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    code = ("import sys, napari_daeformer.inference, napari_daeformer.io, napari_daeformer.metrics, "
            "napari_daeformer.checkpoint; sys.exit(1 if 'training' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
