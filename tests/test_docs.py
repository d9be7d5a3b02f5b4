"""The documentation cannot rot: runnable blocks are run, the CLI reference matches the parser, images exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SLOW_PAGES = {"ct.md"}                  # over 20 s on 2 cores: marked slow (CI runs it; `-m "not slow"` skips it)
RUNNABLE = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def runnable_blocks(page: Path) -> list[str]:
    return RUNNABLE.findall(page.read_text())


@pytest.mark.parametrize("page", [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
                                  for p in PAGES if runnable_blocks(p)], ids=lambda p: p.name)
def test_runnable_blocks(page: Path, tmp_path: Path) -> None:
    """Each page's marked blocks run in order, in one fresh folder, and succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DISPLAY": ""}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    for block in runnable_blocks(page):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page.name}:\n{block}\n--- stdout\n{result.stdout[-3000:]}\n" \
                                       f"--- stderr\n{result.stderr[-3000:]}"


def test_cli_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from make_cli_reference import OUT, reference
    finally:
        sys.path.pop(0)
    assert OUT.read_text() == reference(), "docs/cli.md is stale: run python docs/make_cli_reference.py"


def test_pages_link_to_existing_files() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_widget_control_has_a_tooltip_or_is_self_explanatory(make_napari_viewer) -> None:  # type: ignore[no-untyped-def]
    """Inputs carry tooltips; only plain buttons and read-outs may go without."""
    from magicgui.widgets import Label, ProgressBar, PushButton, Table

    viewer = make_napari_viewer()
    for name in ("Segment with DAE-Former", "Fine-tune DAE-Former", "Batch segment folder"):
        _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", name)
        missing = [w.label for w in widget if not w.tooltip and not isinstance(w, (Label, ProgressBar, PushButton, Table))]
        assert not missing, f"{name}: no tooltip on {missing}"
