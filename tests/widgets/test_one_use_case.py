"""One use case serves every caller: `daeformer segment`, `daeformer batch` and the Segment dock give the same
labels and the same measures for the same file (issue 32)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.app.cli import main
from napari_daeformer.io import METADATA_KEY, read_image
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.record import default_affine
from napari_daeformer.io.sample_data import synthetic_ct
from napari_daeformer.plugin.writer import in_storage

pytestmark = pytest.mark.gui


def test_cli_batch_and_dock_agree(tmp_path: Path, make_napari_viewer, qtbot, capsys) -> None:  # type: ignore[no-untyped-def]
    sample = synthetic_ct(seed=12, shape=(5, 96, 96))
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", sample.image, default_affine((4.0, 0.7, 0.7)))
    engine = ["--device", "cpu", "--precision", "fp32"]

    assert main(["segment", str(scan), str(tmp_path / "cli.nii.gz"), *engine]) == 0
    printed = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    cli = read_image(tmp_path / "cli.nii.gz").data

    assert main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", *engine]) == 0
    batch = read_image(tmp_path / "out" / "scan.nii.gz").data
    with open(tmp_path / "out" / "summary.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))

    viewer = make_napari_viewer()
    viewer.open(str(scan), plugin="napari-daeformer")
    _, dock = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    dock._image.value = viewer.layers[0]
    dock._device.value, dock._precision.value = "cpu", "fp32"
    dock._run.clicked()
    qtbot.waitUntil(lambda: not dock.running, timeout=60_000)
    widget = in_storage(np.asarray(viewer.layers[-1].data), viewer.layers[-1].metadata[METADATA_KEY])[0]

    assert cli.any() and np.array_equal(cli, batch) and np.array_equal(cli, widget)
    report = dock.last_result.measures
    assert report.unit == "mL" and set(printed) == set(report.values)            # every class, in mL
    for name, value in report.values.items():
        assert printed[name] == report.text(name) and f"{name}: {report.text(name)}" in dock._status.value
        assert float(row[name]) == pytest.approx(value, abs=5e-4) and row["unit"] == "mL"
