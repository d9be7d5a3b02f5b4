"""Batch folder processing: mixed inputs, failures listed, existing outputs skipped, SIGKILL-resume, gloo shards."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage import io as skio

from napari_daeformer.app.cli import main
from napari_daeformer.base.jobs import drain
from napari_daeformer.io import read_image, write_labels
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.orientation import radiological_affine
from napari_daeformer.io.sample_data import shifted, synthetic_ct, synthetic_skin
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.tasks.batch import BatchJob, list_inputs, output_paths, run_batch

from .io.test_nifti_tiff_photo import oblique_affine

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_folder(root: Path, volumes: int = 2) -> None:
    (root / "photos").mkdir(parents=True)
    for s in range(volumes):
        ct = synthetic_ct(seed=s, shape=(6, 80, 80))
        write_nifti(root / f"ct{s}.nii.gz", ct.image, oblique_affine())
    for s in range(2):
        skio.imsave(str(root / "photos" / f"lesion{s}.png"), synthetic_skin(seed=s, size=(64, 64)).image,
                    check_contrast=False)
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    (root / "report.docx").write_bytes(b"PK\x03\x04 a report")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["input"]: row for row in csv.DictReader(f)}


def make_review_folder(root: Path) -> list[str]:
    """Three phantoms as the bundled model knows them and three as other scanners give them; the shifted names."""
    root.mkdir(parents=True)
    for seed in (40, 41, 42):
        write_nifti(root / f"phantom{seed}.nii.gz", synthetic_ct(seed=seed, shape=(10, 160, 160)).image,
                    radiological_affine((1.0, 1.0, 1.0)))
    names = []
    for seed, shift in zip((43, 44, 45), ("offset", "noise", "contrast")):
        sample = shifted(synthetic_ct(seed=seed, shape=(10, 160, 160)), shift, seed=seed)
        write_nifti(root / f"{shift}{seed}.nii.gz", sample.image, radiological_affine((1.0, 1.0, 1.0)))
        names.append(f"{shift}{seed}.nii.gz")
    return names


def test_rank_puts_shifted_scans_first(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    shifted_names = make_review_folder(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), str(out), "--device", "cpu", "--quiet", "--rank"]) == 0
    with open(out / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    order = [r["input"] for r in rows]
    assert set(order[:3]) == set(shifted_names), order                     # the other scanners' scans first
    entropy = [float(r["mean_entropy"]) for r in rows]
    assert entropy == sorted(entropy, reverse=True)
    for r in rows:
        assert 0 <= int(r["most_uncertain_slice"]) < 10
    listing = capsys.readouterr().out
    assert "most uncertain first" in listing and listing.index(order[0]) < listing.index(order[-1])
    assert main(["batch", str(tmp_path / "in"), str(out), "--device", "cpu", "--quiet", "--rank"]) == 0   # resume
    with open(out / "summary.csv", encoding="utf-8") as f:
        again = list(csv.DictReader(f))
    assert [r["status"] for r in again] == ["existing"] * 6
    assert [(r["input"], r["mean_entropy"]) for r in again] == [(r["input"], r["mean_entropy"]) for r in rows]
    assert [(r["seconds"], r["checkpoint"]) for r in again] == [(r["seconds"], r["checkpoint"]) for r in rows]
    assert all(float(r["seconds"]) > 0 for r in again)                 # the first run's times are kept
    skin = tmp_path / "skin.safetensors"
    skin.write_bytes(bundled_model("skin").read_bytes())
    assert main(["batch", str(tmp_path / "in"), str(out), "--device", "cpu", "--quiet", "--model", str(skin)]) == 0
    with open(out / "summary.csv", encoding="utf-8") as f:                 # another model: outputs not its own
        assert {r["checkpoint"] for r in csv.DictReader(f)} == {rows[0]["checkpoint"]}


def test_mixed_folder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src)
    write_labels(out / "ct1.nii.gz", np.zeros((6, 80, 80), np.uint8), overwrite=True)    # an existing output
    before = (out / "ct1.nii.gz").read_bytes()
    assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2 file(s) failed" in err and "corrupt.nii.gz" in err and "report.docx" in err
    rows = _rows(out / "summary.csv")
    assert {k: v["status"] for k, v in rows.items()} == {
        "ct0.nii.gz": "done", "ct1.nii.gz": "existing", "corrupt.nii.gz": "failed", "report.docx": "failed",
        "photos/lesion0.png": "done", "photos/lesion1.png": "done"}
    assert (out / "ct1.nii.gz").read_bytes() == before                    # skipped, not recomputed
    ct = read_image(out / "ct0.nii.gz")
    assert np.array_equal(ct.affine, read_image(src / "ct0.nii.gz").affine) and ct.data.shape == (6, 80, 80)
    assert np.issubdtype(nib.load(str(out / "ct0.nii.gz")).get_data_dtype(), np.integer)
    photo = read_image(out / "photos" / "lesion0.png")
    assert photo.data.shape == (64, 64) and set(np.unique(photo.data)) <= {0, 1}
    assert float(rows["ct0.nii.gz"]["liver"]) > 0 and rows["ct0.nii.gz"]["unit"] == "mL"
    assert float(rows["photos/lesion0.png"]["lesion"]) > 0 and rows["photos/lesion0.png"]["unit"] == "pixels"
    assert rows["ct0.nii.gz"]["checkpoint"] == "ct_small.safetensors" and len(rows["ct0.nii.gz"]["checkpoint_sha256"]) == 64


def test_prefetch_and_plain_give_the_same_outputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_folder(src, volumes=3)
    for prefetch in (True, False):
        job = BatchJob(src, tmp_path / f"out{prefetch}", patterns=("*.nii.gz",), device="cpu", prefetch=prefetch)
        summary = drain(run_batch(job))
        assert [r.status for r in summary.results] == ["failed", "done", "done", "done"]
    for name in ("ct0.nii.gz", "ct1.nii.gz", "ct2.nii.gz"):
        assert np.array_equal(read_image(tmp_path / "outTrue" / name).data, read_image(tmp_path / "outFalse" / name).data)


KILL_AFTER_FIRST = """
import os, signal, sys
import napari_daeformer.base.atomic as atomic
real_replace, real_link = os.replace, os.link
def landed(dst):
    if str(dst).endswith(".nii.gz"):
        os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    real_replace(src, dst)
    landed(dst)
def link(src, dst):          # a write that must not replace lands by a hard link
    real_link(src, dst)
    landed(dst)
atomic.os.replace, atomic.os.link = replace, link
from napari_daeformer.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, volumes=3)
    args = ["batch", str(src), str(out), "--pattern", "*.nii.gz", "--device", "cpu", "--quiet"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST, *args], env=ENV, capture_output=True, timeout=300)
    assert killed.returncode == -9
    first = sorted(p.name for p in out.glob("*.nii.gz") if not p.name.startswith("."))   # a hidden temporary may
    assert first == ["ct0.nii.gz"]                                      # stay (killed before its unlink): removed below
    stamp = (out / "ct0.nii.gz").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "napari_daeformer.app", *args], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and "corrupt.nii.gz" in again.stderr       # the corrupt file still fails
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ct0.nii.gz", "ct1.nii.gz", "ct2.nii.gz"]
    assert (out / "ct0.nii.gz").stat().st_mtime_ns == stamp                 # not recomputed
    for name in ("ct0.nii.gz", "ct1.nii.gz", "ct2.nii.gz"):
        assert read_image(out / name).data.shape == (6, 80, 80)              # complete files
    assert _rows(out / "summary.csv")["ct0.nii.gz"]["status"] == "existing"
    assert not list(out.glob(".*tmp*"))


@pytest.mark.slow
def test_two_gloo_ranks_shard_the_folder(tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_folder(src, volumes=3)
    base = ["--pattern", "*.nii.gz", "--pattern", "photos/*.png", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "napari_daeformer.app", "batch", str(src), str(tmp_path / "one"),
                          *base], env=ENV, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "napari_daeformer.app", "batch", str(src), str(tmp_path / "two"), *base],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-2000:]    # the corrupt file fails in both
    rows1, rows2 = _rows(tmp_path / "one" / "summary.csv"), _rows(tmp_path / "two" / "summary.csv")
    assert rows1.keys() == rows2.keys() and len(rows2) == 6                  # each file exactly once
    assert [r["status"] for r in rows2.values()].count("done") == 5
    outputs1 = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")
                       if p.is_file() and not p.name.startswith("."))
    outputs2 = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*")
                       if p.is_file() and not p.name.startswith("."))
    assert outputs1 == outputs2
    for rel in outputs1:
        if rel.name != "summary.csv":
            assert np.array_equal(read_image(tmp_path / "one" / rel).data, read_image(tmp_path / "two" / rel).data)


def test_a_killed_runs_uncertainty_reaches_the_ranking(tmp_path: Path) -> None:
    """The uncertainty of the files a killed run finished was lost with it (only the summary at the end held it), so
    `--rank` left them out for good: each finished file's row is now kept as it finishes."""
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, volumes=2)
    args = ["batch", str(src), str(out), "--pattern", "ct*.nii.gz", "--device", "cpu", "--quiet", "--rank"]
    kill_at_row = KILL_AFTER_FIRST.replace('endswith(".nii.gz")', 'endswith(".csv")')
    killed = subprocess.run([sys.executable, "-c", kill_at_row, *args], env=ENV, capture_output=True, timeout=300)
    assert killed.returncode == -9 and not (out / "summary.csv").exists()
    again = subprocess.run([sys.executable, "-m", "napari_daeformer.app", *args], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = _rows(out / "summary.csv")
    assert rows["ct0.nii.gz"]["status"] == "existing" and rows["ct1.nii.gz"]["status"] == "done"
    assert all(float(r["mean_entropy"]) > 0 for r in rows.values())            # the killed run's too
    assert "ct0.nii.gz  slice" in again.stdout and "ct1.nii.gz  slice" in again.stdout
    assert not list(out.glob(".summary-progress*"))                           # the summary replaces the rows


def test_an_image_inside_a_dicom_series_folder_is_an_input(tmp_path: Path) -> None:
    from .conftest import write_dicom_series
    write_dicom_series(tmp_path / "in" / "patient1", np.zeros((3, 8, 8), np.uint16), (2.0, 1.0, 1.0))
    write_nifti(tmp_path / "in" / "patient1" / "resampled.nii.gz", np.zeros((3, 8, 8), np.int16), np.eye(4))
    (tmp_path / "in" / "patient1" / "README.txt").write_text("not an image")
    job = BatchJob(tmp_path / "in", tmp_path / "out")
    assert list_inputs(job) == [tmp_path / "in" / "patient1", tmp_path / "in" / "patient1" / "resampled.nii.gz"]


def test_listing_treats_dicom_folders_as_one_input(tmp_path: Path) -> None:
    from .conftest import write_dicom_series
    write_dicom_series(tmp_path / "in" / "patient1", np.zeros((3, 8, 8), np.uint16), (2.0, 1.0, 1.0))
    job = BatchJob(tmp_path / "in", tmp_path / "out")
    assert list_inputs(job) == [tmp_path / "in" / "patient1"]


def test_a_stray_dicom_file_at_the_root_hides_no_input(tmp_path: Path) -> None:
    """One .dcm beside NIfTIs at the top of the folder is one more input, not the folder as a series; a folder of
    DICOM files alone is one series, written under the folder's name (not a hidden `.nii.gz`)."""
    from .conftest import write_dicom_series
    root = tmp_path / "in"
    write_dicom_series(tmp_path / "series", np.zeros((2, 8, 8), np.uint16), (2.0, 1.0, 1.0))
    stray = sorted((tmp_path / "series").iterdir())[0]
    for s in range(2):
        write_nifti(root / f"ct{s}.nii.gz", synthetic_ct(seed=s, shape=(2, 16, 16)).image, oblique_affine())
    os.rename(stray, root / "stray.dcm")
    job = BatchJob(root, tmp_path / "out")
    assert list_inputs(job) == [root / "ct0.nii.gz", root / "ct1.nii.gz", root / "stray.dcm"]
    alone = BatchJob(tmp_path / "series", tmp_path / "out")
    assert list_inputs(alone) == [tmp_path / "series"]
    assert output_paths(alone, list_inputs(alone)) == {tmp_path / "series": tmp_path / "out" / "series.nii.gz"}


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def hostile_folder(root: Path) -> dict[str, str]:
    """Good files among a bad-affine NIfTI, name collisions, a non-UTF-8 name and a DICOM folder with other files.
    Returns input -> expected output (or "failed")."""
    from .conftest import write_dicom_series
    from .io.hostile import nifti_with_srow_x

    root.mkdir(parents=True)
    write_nifti(root / "ct0.nii.gz", synthetic_ct(seed=0, shape=(3, 64, 64)).image, oblique_affine())
    nifti_with_srow_x(root / "bad_affine.nii.gz", (float("nan"), 0, 0, 0))
    skio.imsave(str(root / "dup.png"), synthetic_skin(seed=1, size=(48, 48)).image, check_contrast=False)
    skio.imsave(str(root / "dup.jpg"), synthetic_skin(seed=2, size=(48, 48)).image, check_contrast=False)
    write_nifti(root / "series2.nii.gz", synthetic_ct(seed=3, shape=(3, 48, 48)).image, oblique_affine())
    hu = synthetic_ct(seed=4, shape=(3, 48, 48)).image
    write_dicom_series(root / "series2", (hu + 1024).clip(0).astype(np.uint16), (2.5, 0.9, 0.9))
    (root / "series2" / "README.txt").write_text("exported by the PACS")
    (root / "series2" / "thumbs.db").write_bytes(b"\0" * 64)
    skio.imsave(str(root / "cafe.png"), synthetic_skin(seed=5, size=(48, 48)).image, check_contrast=False)
    os.rename(root / "cafe.png", os.fsdecode(os.fsencode(root) + b"/caf\xe9.png"))   # a Latin-1 name: not UTF-8
    return {"ct0.nii.gz": "ct0.nii.gz", "bad_affine.nii.gz": "failed", "dup.png": "dup_png.png",
            "dup.jpg": "dup_jpg.png", "series2.nii.gz": "series2_nii_gz.nii.gz", "series2": "series2_dicom.nii.gz",
            "caf\\xe9.png": "caf\\xe9.png"}


def test_hostile_folder_every_good_file_written_every_bad_one_a_row(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src, out = tmp_path / "in", tmp_path / "out"
    expected = hostile_folder(src)
    out.mkdir()
    stale = out / f".tmp-{_dead_pid()}-0123abcd-ct0.nii.gz"                       # a killed write's leftover
    stale.write_bytes(b"half a file")
    assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 file(s) failed" in err and "bad_affine.nii.gz: the voxel-to-world affine holds NaN" in err
    with open(out / "summary.csv", encoding="utf-8") as f:                       # valid UTF-8
        rows = {row["input"]: row for row in csv.DictReader(f)}
    assert {k: r["output"] or "failed" for k, r in rows.items()} == expected
    assert not stale.exists()
    for name, output in expected.items():
        if output != "failed":
            assert rows[name]["status"] == "done"
            assert (out / output.replace("\\xe9", os.fsdecode(b"\xe9"))).is_file(), output
    assert rows["dup.png"]["lesion"] != rows["dup.jpg"]["lesion"]                 # two images, two results
    def outputs() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in ("summary.csv", ".batch-rank0.lock")}
    stamps = outputs()
    assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 1   # resume
    with open(out / "summary.csv", encoding="utf-8") as f:
        again = {row["input"]: row for row in csv.DictReader(f)}
    assert outputs() == stamps                                                    # nothing recomputed
    for name, row in again.items():                                              # nor mixed
        assert row["status"] == ("failed" if expected[name] == "failed" else "existing")
        assert row["output"] == rows[name]["output"]
        for key in ("lesion", "liver", "spleen"):
            if row.get(key):
                assert float(row[key]) == pytest.approx(float(rows[name][key]), abs=1e-3), (name, key)


def test_output_folder_is_the_input_folder_or_a_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "in"
    make_folder(src, volumes=1)
    before = sorted(p.name for p in src.rglob("*"))
    assert main(["batch", str(src), str(src), "--device", "cpu", "--overwrite", "--quiet"]) == 2
    assert "the output folder is the input folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["batch", str(src), str(tmp_path / "file"), "--device", "cpu", "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for pattern in ("/etc/*", "../*"):                       # NotImplementedError, or files beside the folder
        assert main(["batch", str(src), str(tmp_path / "out"), "--pattern", pattern, "--quiet"]) == 2
        assert "patterns are relative to the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in src.rglob("*")) == before and not (tmp_path / "out").exists()


def test_summary_cells_never_start_a_spreadsheet_formula(tmp_path: Path) -> None:
    """A file named '=HYPERLINK(...).nii.gz' or a class '@SUM(A1)' is written quoted (OWASP CSV injection), and
    an earlier run's uncertainty is still found under the real name."""
    import csv
    import io

    from napari_daeformer.tasks.summary import FileResult, read_earlier, summary_csv

    name = '=HYPERLINK("http://x","open").nii.gz'
    csv_text = summary_csv([FileResult(input=name, output="-out.nii.gz", status="done", reason="+1", measures={"@SUM(A1)": 2.0},
                                       unit="mL", mean_entropy=0.5, uncertain_slice=3)])
    rows = list(csv.reader(io.StringIO(csv_text)))
    cells = [c for row in rows for c in row]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
    assert f"'{name}" in cells and "'@SUM(A1)" in rows[0] and "'-out.nii.gz" in cells
    (tmp_path / "summary.csv").write_text(csv_text)
    earlier = read_earlier(tmp_path)[name]
    assert (earlier.mean_entropy, earlier.uncertain_slice, earlier.output) == (0.5, 3, "-out.nii.gz")


def test_a_second_writer_on_one_folder_is_refused_at_its_start(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Two batches on one output folder both reported success over each other's files, and the second summary
    replaced the first: the second now stops before any work, naming the first."""
    from napari_daeformer.tasks.batch import sole_writer

    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, volumes=1)
    job = BatchJob(src, out)
    with sole_writer(job):                                    # a first batch, still running
        assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"another daeformer batch (pid {os.getpid()}) is writing to this folder" in err
        assert err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [".batch-rank0.lock"]   # nothing written, no summary
    with sole_writer(job):                                    # the first one ended: the folder is free again
        pass


def test_an_output_folder_that_cannot_be_written_stops_before_any_work(tmp_path: Path, capsys,  # type: ignore[no-untyped-def]
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder computed every file before failing at the writes; the folder is now held first.
    (The suite may run as root, whom permissions do not stop: the refusal is planted at the lock's open.)"""
    import napari_daeformer.base.folder_lock as lock_module
    import napari_daeformer.tasks.batch as batch_module

    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, volumes=1)
    out.mkdir()

    def refused(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    def never(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("segmented before the folder was known to be writable")

    monkeypatch.setattr(lock_module.os, "open", refused)
    monkeypatch.setattr(batch_module, "segment_file", never)
    assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write there (Permission denied)" in err
