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
# The layers from the bottom up, each a folder (or the training package): a module may import only its own layer and
# those below it. Qt and napari only from `widgets` up; `plugin` is the npe2 contributions and the per-viewer hub.
LAYERS = {
    "base": ("napari_daeformer.base",),
    "io": ("napari_daeformer.io",),
    "model": ("napari_daeformer.model",),
    "engine": ("napari_daeformer.engine",),
    "session": ("napari_daeformer.session",),
    "tasks": ("napari_daeformer.tasks",),
    "training": ("napari_daeformer_training",),             # the installed name of the training/ folder
    "plugin": ("napari_daeformer.plugin",),
    "control": ("napari_daeformer.plugin.control",),
    "widgets": ("napari_daeformer.plugin.widgets",),
    "app": ("napari_daeformer.app",),
}
ORDER = list(LAYERS)
MINIMUM = {"base": 10, "io": 8, "model": 7, "engine": 9, "session": 2, "tasks": 2, "training": 12, "plugin": 5,
           "control": 3, "widgets": 6, "app": 5}


def _modules(package: object) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]  # type: ignore[attr-defined]


def _layer(name: str) -> str:
    """The layer of a module: the layer of the longest folder prefix that holds it."""
    owners = [(len(p), layer) for layer, prefixes in LAYERS.items() for p in prefixes
              if name == p or name.startswith(p + ".")]
    return max(owners)[1] if owners else "unplaced"


def _forbidden(layer: str) -> tuple[str, ...]:
    above = ORDER[ORDER.index(layer) + 1:]
    names = tuple(p for a in above for p in LAYERS[a] if not any(p.startswith(q + ".") or p == q
                                                                  for q in LAYERS[layer]))
    return (*names, *(QT if ORDER.index(layer) < ORDER.index("widgets") else ()))


def test_every_module_sits_in_a_layer_folder() -> None:
    """No module at the package's top level: each lives in the folder of its layer."""
    modules = _modules(napari_daeformer) + _modules(napari_daeformer_training)
    assert [m for m in modules if _layer(m) == "unplaced"] == []
    assert not [p for p in Path(napari_daeformer.__file__).parent.glob("*.py") if p.name != "__init__.py"]


def test_no_product_module_is_over_400_lines() -> None:
    """Small modules with one job each: a module that outgrows 400 lines is split, not left to grow."""
    roots = [Path(napari_daeformer.__file__).parent, Path(napari_daeformer_training.__file__).parent]
    sizes = {str(p): len(p.read_text().splitlines()) for root in roots for p in root.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


@pytest.mark.parametrize("layer", ORDER[:-1])
def test_each_layer_imports_only_the_layers_below(layer: str) -> None:
    """Importing the layer's modules one by one (in a fresh interpreter) loads nothing above it (Qt and napari
    count as above every layer under `widgets`); the first module that does is named."""
    modules = [m for m in _modules(napari_daeformer) + _modules(napari_daeformer_training) if _layer(m) == layer]
    assert len(modules) >= MINIMUM[layer], modules
    forbidden = _forbidden(layer)
    code = ("import importlib, sys\n"
            "forbidden = tuple(sys.argv[1].split(','))\n"
            "for name in sys.argv[2:]:\n"
            "    importlib.import_module(name)\n"
            "    bad = sorted(m for m in sys.modules if m in forbidden or m.startswith(tuple(f + '.' for f in forbidden)))\n"
            "    if bad:\n"
            "        sys.exit(f'{name} loads {bad}')\n")
    result = subprocess.run([sys.executable, "-c", code, ",".join(forbidden), *modules], capture_output=True,
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
