"""A DICOM series opened in napari, segmented, saved as DICOM-SEG through napari's save, and opened back on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.io.record import CHECKPOINT_SHA_KEY

from ..io.test_dicom_seg import frames_by_source, phantom_series

pytestmark = pytest.mark.gui


def test_segment_export_and_reopen_dicom_seg(make_napari_viewer, qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    phantom_series(tmp_path / "series", slices=8)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "series"), plugin="napari-daeformer")
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    widget._image.value = image
    widget._run.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    layer = viewer.layers[f"{image.name} DAE-Former"]
    layer.data[3, 40:60, 40:60] = 2                                   # a correction before export
    assert len(layer.metadata[CHECKPOINT_SHA_KEY]) == 64
    out = tmp_path / "export" / "labels.dcm"
    out.parent.mkdir()
    layer.save(str(out), plugin="napari-daeformer")

    frames = frames_by_source(out)
    sources = sorted((pydicom.dcmread(str(f)) for f in (tmp_path / "series").iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))
    labels = np.asarray(layer.data)
    assert frames
    for k, ds in enumerate(sources):                                   # voxel for voxel, frame by source instance
        for number in range(1, 6):
            frame = frames.get((str(ds.SOPInstanceUID), number))
            mask = labels[k] == number
            assert np.array_equal(frame.astype(bool), mask) if frame is not None else not mask.any(), (k, number)

    (back,) = viewer.open(str(out), plugin="napari-daeformer")        # found its series in the sibling folder
    assert back.__class__.__name__ == "Labels"
    assert np.array_equal(back.data, labels)
    np.testing.assert_allclose(back.scale, image.scale)
    np.testing.assert_allclose(back.translate, image.translate)
    assert back.metadata["class_names"][1] == "liver"


def test_dicom_seg_refused_for_labels_not_on_a_series(make_napari_viewer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.ones((4, 16, 16), np.uint8), name="painted")
    with pytest.raises(Exception, match="not made on one"):
        layer.save(str(tmp_path / "painted.dcm"), plugin="napari-daeformer")
    assert not (tmp_path / "painted.dcm").exists()
