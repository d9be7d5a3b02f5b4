"""The simulated annotator's effort accounting (`benchmarks/bench_annotate.py`), pinned on tiny volumes whose answer
is worked out by hand, and the benchmark run end to end at a small size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from bench_annotate import TimeModel, fill_proposer, simulate  # noqa: E402

SQUARE = np.zeros((10, 10), np.uint8)
SQUARE[2:5, 2:5] = 1                    # 9 pixels, 8 on the outline (the centre one is inside)


def test_a_slice_costs_a_visit_a_region_and_its_outline() -> None:
    model = TimeModel(visit_s=2.0, region_s=3.0, outline_s=0.05)
    assert model.correction(np.zeros_like(SQUARE), SQUARE) == (pytest.approx(2.0 + 3.0 + 8 * 0.05), 9)
    assert model.correction(SQUARE.copy(), SQUARE) == (2.0, 0)                      # right already: look, accept
    shifted = np.roll(SQUARE, 1, axis=1)                                             # off by one column
    seconds, voxels = model.correction(shifted, SQUARE)
    assert voxels == 6 and seconds == pytest.approx(2.0 + 2 * 3.0 + 6 * 0.05)      # 3 pixels painted back, 3
    #                                        erased (painted background): 2 regions, 6 outline pixels; clearing the
    #                                        slice and painting it again would cost 2 + 3 + (3 + 0.4) = 8.4
    moved = np.roll(SQUARE, 5, axis=0)                                              # all wrong: repainting is cheaper
    assert model.correction(moved, SQUARE)[0] == pytest.approx(2.0 + 3.0 + 3.0 + 8 * 0.05)


def test_painting_every_slice_by_hand() -> None:
    truth = np.stack([SQUARE] * 3)
    curve = simulate(truth, np.arange(0), None, TimeModel())
    per_slice = 2.0 + 3.0 + 8 * 0.05
    assert curve.seconds == pytest.approx([per_slice, 2 * per_slice, 3 * per_slice])
    assert curve.dice == pytest.approx([2 * 9 / 36, 2 * 18 / 45, 1.0])             # 9 of 27 voxels, 18, all
    assert curve.effort_to(0.9) == pytest.approx(3 * per_slice) and curve.edited == 3 and curve.voxels == 27


def test_fill_between_two_painted_slices_leaves_only_looking() -> None:
    truth = np.stack([SQUARE] * 5)
    curve = simulate(truth, np.array([0, 4]), fill_proposer, TimeModel())
    per_slice = 2.0 + 3.0 + 8 * 0.05
    assert curve.seconds == pytest.approx([per_slice, 2 * per_slice, 2 * per_slice, *(2 * per_slice + 2.0 * k
                                                                                     for k in (1, 2, 3))])
    assert curve.dice[2] == pytest.approx(1.0) and curve.effort_to(0.95) == pytest.approx(2 * per_slice)
    assert curve.edited == 2 and curve.waited == 0.0


@pytest.mark.slow
def test_the_benchmark_runs_every_arm_at_a_small_size(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(BENCH / "bench_annotate.py"), "--cases", "lesion", "--seeds", "0",
                          "--threads", "1", "--max-train-minutes", "0.1", "--max-teach-minutes", "0.1",
                          "--curves", str(tmp_path / "c.csv")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lesion |")]
    assert [r.split("|")[2].strip() for r in rows] == ["paint", "fill", "model", "teach", "teach-model"]
    assert (tmp_path / "c.csv").read_text().startswith("case,seed,arm,step,seconds,dice")
