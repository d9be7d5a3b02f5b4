"""The benchmarks' "official model" computes our model's function: its speed is a fair baseline for ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_daeformer.model import DAEFormer

from .conftest import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _official_layout import official_forward  # noqa: E402


def test_official_layout_computes_our_logits() -> None:
    torch.manual_seed(0)
    model = DAEFormer(TINY).eval()
    x = torch.randn(2, TINY.in_channels, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(official_forward(model)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["bench_inference.py", "--device", "cpu", "--slices", "1", "--variants", "ours-fp32,ours-fp32-neighbours",
     "--rounds", "1", "--threads", "1"],
    ["bench_model.py", "--device", "cpu", "--batches", "1", "--rounds", "1", "--paths", "fp32", "--threads", "1"],
])
def test_the_speed_benchmarks_run(argv: list[str]) -> None:
    """At their smallest sizes, so that a renamed engine name cannot break them unseen (both once read
    `static_int8.CACHE_ENV` after it moved to `package_cache`)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    done = subprocess.run([sys.executable, str(bench / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fp32" in done.stdout


def test_the_sparse_annotation_benchmark_runs() -> None:
    """`bench_sparse.py` at its smallest (one seed, 3 slices, a few steps): a row per method with each class's Dice."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sparse.py"
    done = subprocess.run([sys.executable, str(bench), "--cases", "chest", "--slices", "3", "--seeds", "1",
                           "--minutes", "0.2", "--recipe", "steps=4", "--neighbours", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| chest | 3 |")]
    assert [r.split(" | ")[2] for r in rows] == ["interpolation", "new model", "new model, neighbours at 0"], rows
    assert "slices picked: cover" in done.stdout and all("nodule" in r and "trachea" in r for r in rows)
