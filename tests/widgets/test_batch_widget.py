"""The batch widget in a real viewer: per-file status, cancel after the current file, open a finished pair."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.io import read_image
from napari_daeformer.plugin.widgets.batch import COLUMNS

from ..test_batch import make_folder, make_review_folder

pytestmark = pytest.mark.gui


def _widget(make_napari_viewer, src: Path, out: Path):  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Batch segment folder")
    widget._input.value, widget._output.value = src, out
    widget._device.value = "cpu"
    return viewer, widget


def test_folder_with_status_table_and_open(make_napari_viewer, qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src)
    viewer, widget = _widget(make_napari_viewer, src, out)
    widget._run.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=180_000)
    table = widget._table.value["data"]
    statuses = {row[0]: row[1] for row in table}
    assert statuses["ct0.nii.gz"] == "done" and statuses["corrupt.nii.gz"] == "failed"
    assert statuses["photos/lesion1.png"] == "done" and len(table) == 6
    assert (out / "summary.csv").exists() and "2 failed" in widget._status.value
    failed = [r[1] for r in table].index("failed")
    reason = widget._table.native.item(failed, COLUMNS.index("reason"))
    assert reason.toolTip() and reason.foreground().color().name() == "#e0605a"      # full reason, red row
    assert any(str(r[COLUMNS.index("measures")]).endswith("mL") for r in table)
    assert all(re.search(r"\n\d+\.\d s$", widget._table.native.item(i, 0).toolTip()) for i in range(len(table)))
    assert [r[1] for r in table][-2:] == ["failed", "failed"]            # ranked: failed files (no measure) last
    widget._table.native.selectRow([r[0] for r in table].index("ct0.nii.gz"))
    widget._open.clicked()                                              # the button, with the table's selection
    assert [layer.name for layer in viewer.layers] == ["ct0", "ct0 labels"]
    assert tuple(viewer.layers["ct0 labels"].scale) == tuple(viewer.layers["ct0"].scale)


def test_cancel_after_current_file(make_napari_viewer, qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, out = tmp_path / "in", tmp_path / "out"
    make_folder(src, volumes=4)
    viewer, widget = _widget(make_napari_viewer, src, out)
    widget._pattern.value = "*.nii.gz"
    widget._run.clicked()
    widget._worker.yielded.connect(lambda p: widget._cancel.clicked() if p.result is not None
                                   and p.result.status == "done" else None)
    qtbot.waitUntil(lambda: not widget.running, timeout=180_000)
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert 1 <= len(written) < 4                                         # stopped early
    for name in written:
        assert read_image(out / name).data.shape == (6, 80, 80)          # finished outputs are complete
    assert "Cancelled" in widget._status.value
    assert np.all([row[1] in ("done", "failed") for row in widget._table.value["data"]])


def test_open_next_uncertain_case(make_napari_viewer, qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shifted = make_review_folder(tmp_path / "in")
    viewer, widget = _widget(make_napari_viewer, tmp_path / "in", tmp_path / "out")
    widget._run.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=180_000)
    table = widget._table.value["data"]
    assert {row[0] for row in table[:3]} == set(shifted)                  # the other scanners' scans on top
    assert [float(row[2]) for row in table] == sorted((float(row[2]) for row in table), reverse=True)
    widget._next_case.clicked()
    first = widget.results[0]
    assert [layer.name for layer in viewer.layers] == [first.input.split(".")[0], f"{first.input.split('.')[0]} labels"]
    assert viewer.dims.current_step[0] == first.uncertain_slice
    widget._next_case.clicked()                                           # then the next one down the list
    assert viewer.layers[-1].name == f"{widget.results[1].input.split('.')[0]} labels"
    assert "4 more to review" in widget._status.value
