"""Fill between slices (`session.fill`, ITK's morphological contour interpolation) and `daeformer interpolate`:
answers known by hand on small volumes, painted slices never changed, bad input in one line."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_daeformer.app.cli import main
from napari_daeformer.session.fill import FillError, fill_between


def _disk(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_a_cylinder_painted_at_its_ends_is_filled_whole_and_nothing_else_moves() -> None:
    labels = np.zeros((12, 48, 48), np.uint8)
    disk = _disk((48, 48), (24, 24), 10)
    labels[2][disk] = labels[9][disk] = 1
    labels[2][_disk((48, 48), (6, 6), 3)] = labels[9][_disk((48, 48), (6, 6), 3)] = 2
    labels[11, 40:44, 40:44] = 1                                      # outside the painted range: left as it is
    painted = np.zeros(12, bool)
    painted[[2, 9]] = True
    filled = fill_between(labels, painted)
    for z in range(3, 9):
        assert _dice(filled[z] == 1, disk) > 0.95 and (filled[z] == 2).sum() > 0
    assert np.array_equal(filled[[0, 1, 2, 9, 10, 11]], labels[[0, 1, 2, 9, 10, 11]])
    assert labels[5].max() == 0                                      # the input is not modified


def test_a_cone_grows_between_its_slices_along_any_axis() -> None:
    labels = np.zeros((40, 40, 9), np.uint16)                         # slices along the last axis
    labels[..., 0][_disk((40, 40), (20, 20), 4)] = 300               # a value beyond uint8
    labels[..., 8][_disk((40, 40), (20, 20), 16)] = 300
    painted = np.zeros(9, bool)
    painted[[0, 8]] = True
    filled = fill_between(labels, painted, axis=2)
    areas = [(filled[..., z] == 300).sum() for z in range(9)]
    assert all(a < b for a, b in zip(areas, areas[1:])) and filled.dtype == np.uint16


def test_a_slice_painted_empty_is_kept_and_nothing_is_invented_beside_it() -> None:
    """A structure painted on one side of a gap only (the other slice painted "nothing here") is not carried into
    the gap; a structure on both sides of the next gap is."""
    labels = np.zeros((13, 32, 32), np.uint8)
    labels[0][_disk((32, 32), (16, 16), 8)] = labels[8][_disk((32, 32), (16, 16), 8)] = 1
    labels[12][_disk((32, 32), (16, 16), 6)] = 1
    painted = np.zeros(13, bool)
    painted[[0, 4, 8, 12]] = True                                     # slice 4: "nothing here"
    filled = fill_between(labels, painted)
    assert filled[4].max() == 0 and not filled[1:4].any() and not filled[5:8].any()
    assert all(filled[z].sum() > 0 for z in range(9, 12))


@pytest.mark.parametrize(("labels", "painted", "message"), [
    (np.ones((8, 8), np.uint8), np.ones(8, bool), "needs a volume; these labels are 2D"),
    (np.ones((4, 8, 8), np.uint8), np.array([True, False, False, False]), "paint at least two slices"),
    (np.zeros((4, 8, 8), np.uint8), np.array([True, False, False, True]), "hold no label"),
    (np.ones((4, 8, 8), np.float32), np.array([True, False, False, True]), "whole numbers"),
])
def test_bad_input_is_one_line(labels: np.ndarray, painted: np.ndarray, message: str) -> None:
    with pytest.raises(FillError, match=message) as e:
        fill_between(labels, painted)
    assert "\n" not in str(e.value)


def test_the_command_fills_a_nifti_and_keeps_its_affine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = np.zeros((48, 48, 10), np.uint8)                           # NIfTI order: slices along the last axis
    disk = _disk((48, 48), (20, 26), 9)
    data[..., 1][disk] = data[..., 7][disk] = 3
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = (-40, 12, 7)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "painted.nii.gz")
    out = tmp_path / "filled.nii.gz"
    assert main(["interpolate", str(tmp_path / "painted.nii.gz"), str(out), "--axis", "0"]) == 0
    assert "filled 5 slice(s) between 2 painted" in capsys.readouterr().out
    img = nib.load(out)
    assert np.allclose(img.affine, affine)
    filled = np.asarray(img.dataobj)
    assert all(_dice(filled[..., z] == 3, disk) > 0.95 for z in range(2, 7))
    assert main(["interpolate", str(tmp_path / "painted.nii.gz"), str(out), "--axis", "0"]) == 2   # no overwrite
    assert "already exists" in capsys.readouterr().err


def test_the_command_refuses_one_painted_slice_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = np.zeros((4, 16, 16), np.uint8)
    data[1, 4:8, 4:8] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii.gz")
    assert main(["interpolate", str(tmp_path / "one.nii.gz"), str(tmp_path / "out.nii.gz"), "--axis", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("daeformer interpolate: error: ") and "paint at least two slices" in err
    assert err.count("\n") == 1 and not (tmp_path / "out.nii.gz").exists()


def test_a_lesion_inside_an_organ_stays_inside_it() -> None:
    """Where two labels' interpolations overlap the smaller structure keeps the voxel."""
    labels = np.zeros((7, 40, 40), np.uint8)
    for z in (0, 6):
        labels[z][_disk((40, 40), (20, 20), 14)] = 1
        labels[z][_disk((40, 40), (20, 20), 4)] = 2
    painted = np.zeros(7, bool)
    painted[[0, 6]] = True
    filled = fill_between(labels, painted)
    lesion = _disk((40, 40), (20, 20), 4)
    assert all(_dice(filled[z] == 2, lesion) > 0.9 and (filled[z] == 1).sum() > 400 for z in range(1, 6))


def test_a_viewer_fills_in_a_child_process_and_never_loads_itk_itself(tmp_path: Path) -> None:
    """ITK's wrappers hold the GIL while they load (seconds at a stretch): a viewer's fill runs in a child process
    (`fill_in_child`), gives what `fill_between` gives and brings a refusal back as the same one-line error. The
    child never runs the caller's script again (a script with no `__main__` guard, as napari scripts often are:
    multiprocessing's spawn re-ran it)."""
    import subprocess
    import sys

    script = (
        "print('script started')\n"
        "import sys, threading, time\n"
        "import numpy as np\n"
        "from napari_daeformer.session.fill import FillError, fill_between, fill_in_child\n"
        "labels = np.zeros((8, 32, 32), np.uint8); labels[1, 8:20, 8:20] = 1; labels[6, 12:24, 12:24] = 1\n"
        "painted = np.zeros(8, bool); painted[[1, 6]] = True\n"
        "gaps, last, stop = [], [time.perf_counter()], threading.Event()\n"
        "def tick():\n"
        "    while not stop.is_set():\n"
        "        time.sleep(0.01); now = time.perf_counter(); gaps.append(now - last[0]); last[0] = now\n"
        "t = threading.Thread(target=tick); t.start()\n"
        "filled = fill_in_child(labels, painted)\n"
        "stop.set(); t.join()\n"
        "assert 'itk' not in sys.modules, 'ITK loaded in the caller'\n"
        "assert max(gaps) < 1.0, max(gaps)\n"
        "try:\n"
        "    fill_in_child(labels, np.zeros(8, bool))\n"
        "except FillError as e:\n"
        "    print('refused:', e)\n"
        "assert np.array_equal(filled, fill_between(labels, painted)) and filled[3].any()\n"
        "print('ok')\n")
    (tmp_path / "script.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "script.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: paint at least two slices to fill between them (0 painted)" in out.stdout and "ok" in out.stdout
    assert out.stdout.count("script started") == 1
