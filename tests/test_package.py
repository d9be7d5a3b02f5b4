"""Packaging: the manifest validates, each layer imports only the layers below it, the CLI answers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import napari_daeformer_training
import pytest

import napari_daeformer
from napari_daeformer.app.cli import main


def test_npe2_manifest_validates() -> None:
    result = subprocess.run(["npe2", "validate", "napari-daeformer"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_cli_help_and_one_line_errors(capsys) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(["daeformer", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "import-official" in result.stdout
    assert main(["info", "missing.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daeformer info: error: ") and err.count("\n") == 1


def test_cli_info_prints_paper_parameter_count(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "paper", "--in-channels", "3"]) == 0
    assert "29.69 M" in capsys.readouterr().out


QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")
APP, WIDGETS, CONTROL = "napari_daeformer.app", "napari_daeformer.widgets", "napari_daeformer.control"
TRAINING = "napari_daeformer_training"              # the installed name of the training/ folder


def _modules(package: object) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]  # type: ignore[attr-defined]


def _layer(name: str) -> str:
    if name.startswith(APP):
        return "app"
    if name.startswith(WIDGETS):
        return "widgets"
    if name.startswith(CONTROL):
        return "control"
    return "training" if name.startswith(TRAINING) else "core"


FORBIDDEN = {"core": (*QT, TRAINING, CONTROL, APP, WIDGETS), "training": (*QT, CONTROL, APP, WIDGETS),
             "control": (*QT, APP, WIDGETS), "widgets": (APP,)}


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below(layer: str) -> None:
    """core < training < widgets < app: importing the layer's modules one by one (in a fresh interpreter) loads
    nothing above it; the first module that does is named."""
    modules = [m for m in _modules(napari_daeformer) + _modules(napari_daeformer_training) if _layer(m) == layer]
    assert len(modules) >= {"core": 25, "training": 7, "control": 3, "widgets": 6}[layer], modules
    code = ("import importlib, sys\n"
            "forbidden = tuple(sys.argv[1].split(','))\n"
            "for name in sys.argv[2:]:\n"
            "    importlib.import_module(name)\n"
            "    bad = sorted(m for m in sys.modules if m in forbidden or m.startswith(tuple(f + '.' for f in forbidden)))\n"
            "    if bad:\n"
            "        sys.exit(f'{name} loads {bad}')\n")
    result = subprocess.run([sys.executable, "-c", code, ",".join(FORBIDDEN[layer]), *modules], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_a_training_module_in_the_working_folder_does_not_shadow_ours(tmp_path: Path) -> None:
    """`python -m napari_daeformer.app` (the torchrun form) run where the user keeps a training.py of their own: our
    `training/` folder installs as `napari_daeformer_training`, so nothing of the user's is imported (issue 32)."""
    (tmp_path / "training.py").write_text('raise SystemExit("the user\'s training.py was imported")\n')
    run = subprocess.run([sys.executable, "-m", "napari_daeformer.app", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "user's training.py" not in run.stdout + run.stderr, run.stderr[-500:]
    assert "finetune" in run.stdout
