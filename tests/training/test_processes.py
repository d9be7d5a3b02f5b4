"""Whole training processes: SIGKILL during a checkpoint save, and two gloo ranks under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from napari_daeformer_training.state import load_state
from safetensors.torch import load_file

from napari_daeformer.model.checkpoint import load_checkpoint

COMMON = ["--synthetic", "ct", "--train-seeds", "1", "--val-seeds", "2", "--input-size", "64", "--batch-size", "8",
          "--lr", "0.01", "--device", "cpu", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Runs `daeformer train`, but SIGKILLs itself inside the second save of resume.safetensors: after the temporary
# file is complete, before it is renamed over the previous one.
KILLER = """
import os, signal, sys
import napari_daeformer.base.atomic as atomic
real, saves = os.replace, []
def replace(src, dst):
    if str(dst).endswith("resume.safetensors"):
        saves.append(dst)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
atomic.os.replace = replace
from napari_daeformer.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train(args: list[str], launcher: list[str] | None = None, **kwargs: object) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m", "napari_daeformer.app"]) + ["train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kwargs)  # type: ignore[call-overload]


@pytest.mark.slow
def test_sigkill_during_save_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*COMMON, "--out", str(out), "--epochs", "3"]
    killed = subprocess.run([sys.executable, "-c", KILLER, "train", *args], capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(out.glob(".tmp-*-resume.safetensors"))              # the interrupted write, never renamed
    last = load_checkpoint(out / "last.safetensors")                # the last good checkpoint loads
    assert last.card.provenance["epoch"] == 2                       # validation of epoch 2 was written
    assert load_state(out / "resume.safetensors", last.model, torch.optim.SGD(last.model.parameters(), lr=0.1))[
        "epoch"] == 1                                                # the state of epoch 1 is intact
    resumed = _train([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = load_checkpoint(out / "last.safetensors")
    assert final.card.provenance["epoch"] == 3
    assert not list(out.glob(".tmp-*"))                             # removed: its process is gone


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    """Same global batch, no augmentation: DDP (gradient averaging + all-reduced Dice) equals one process."""
    args = [*COMMON, "--epochs", "1", "--max-steps", "4", "--no-augment"]
    single = _train([*args, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "napari_daeformer.app"]
    double = _train([*args, "--out", str(tmp_path / "two")], launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "last.safetensors"))
    b = load_file(str(tmp_path / "two" / "last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    config = (tmp_path / "two" / "config.yaml").read_text()
    assert "world_size: 2" in config
