"""A clone with nothing beside it passes: no test may need a file outside the repository (such as ../shared)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout (CI runs from a clone)")
def test_a_lone_clone_collects_and_passes_its_data_tests(tmp_path: Path) -> None:
    clone = tmp_path / "lone" / "napari-daeformer"                    # nothing beside it: no ../shared
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}                     # the clone's code, not the checkout's
    # One run: the whole suite is collected (every module imports without ../shared), the data tests are run.
    ran = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                          "-k", "test_official_import"], cwd=clone, env=env, capture_output=True, text=True)
    assert ran.returncode == 0 and " passed" in ran.stdout and " deselected" in ran.stdout, \
        ran.stdout[-2000:] + ran.stderr[-2000:]
