"""NRRD and 3D Slicer .seg.nrrd: geometry read and written back (LPS <-> RAS), segment names and colours kept."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest

from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image, write_labels
from napari_daeformer.io.nrrd import read_seg_nrrd
from napari_daeformer.io.sample_data import CT_CLASSES, synthetic_ct

# An oblique LPS volume as 3D Slicer writes it: rows are the directions of the x, y, z index axes.
DIRECTIONS = np.array([[0.8, 0.1, 0.0], [-0.1, 0.8, 0.0], [0.0, 0.0, 2.5]])
ORIGIN = np.array([120.0, -80.5, 33.0])


def slicer_volume(path: Path, data: np.ndarray) -> None:
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": DIRECTIONS,
                                 "space origin": ORIGIN, "kinds": ["domain"] * 3, "encoding": "gzip"},
               index_order="C")


def test_a_slicer_volume_keeps_its_geometry(tmp_path: Path) -> None:
    ct = synthetic_ct(seed=0, shape=(6, 32, 40))
    slicer_volume(tmp_path / "scan.nrrd", ct.image)
    record = read_image(tmp_path / "scan.nrrd")
    assert record.data.shape == (6, 32, 40) and np.array_equal(record.data, ct.image)
    assert record.modality == "ct" and record.source_format == "nrrd"
    flip = np.array([-1.0, -1.0, 1.0])
    assert np.allclose(record.affine[:3, :3], (DIRECTIONS * flip).T) and np.allclose(record.affine[:3, 3], ORIGIN * flip)
    assert np.allclose(record.spacing, (2.5, np.hypot(0.1, 0.8), np.hypot(0.8, 0.1)))
    ijk = np.array([3, 5, 2, 1.0])                                   # index (x, y, z): world as Slicer has it in LPS
    assert np.allclose((record.affine @ ijk)[:3] * flip, ORIGIN + ijk[:3] @ DIRECTIONS)


def test_labels_written_as_seg_nrrd_open_with_their_names_and_place(tmp_path: Path) -> None:
    ct = synthetic_ct(seed=0, shape=(6, 32, 40))
    slicer_volume(tmp_path / "scan.nrrd", ct.image)
    record = read_image(tmp_path / "scan.nrrd")
    colours = ("#000000", "#ff0000", "#00ff00", "#0000ff", "#ffff00", "#00ffff")
    out = write_labels(tmp_path / "scan.seg.nrrd", ct.labels, record, class_names=CT_CLASSES, class_colors=colours)
    _, header = nrrd.read(str(out))
    assert header["space"] == "left-posterior-superior" and np.allclose(header["space directions"], DIRECTIONS)
    assert np.allclose(header["space origin"], ORIGIN)
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "1"
    assert header["Segment0_Color"] == "1 0 0" and header["Segment4_Name"] == "aorta"
    seg = read_seg_nrrd(out)
    assert np.array_equal(seg.record.data, ct.labels) and seg.record.is_labels
    assert seg.class_names == CT_CLASSES and seg.class_colors[1:] == colours[1:]
    assert np.allclose(seg.record.affine, record.affine)


def test_a_seg_nrrd_opens_as_a_named_labels_layer(tmp_path: Path) -> None:
    from napari_daeformer.plugin.reader import get_reader

    ct = synthetic_ct(seed=0, shape=(4, 24, 24))
    out = write_labels(tmp_path / "organs.seg.nrrd", ct.labels, None, class_names=CT_CLASSES)
    data, kwargs, kind = get_reader(str(out))(str(out))[0]
    assert kind == "labels" and np.array_equal(data, ct.labels)
    assert kwargs["metadata"]["class_names"] == list(CT_CLASSES)


def test_bad_nrrd_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.nrrd").write_bytes(b"NRRD0004\ntype: banana\n\n")
    with pytest.raises(ImageFormatError, match="junk.nrrd"):
        read_image(tmp_path / "junk.nrrd")
    nrrd.write(str(tmp_path / "layers.seg.nrrd"), np.zeros((2, 4, 4, 3), np.uint8),
               {"kinds": ["list", "domain", "domain", "domain"]}, index_order="F")
    with pytest.raises(ImageFormatError, match="export it from Slicer as a labelmap"):
        read_image(tmp_path / "layers.seg.nrrd")
    with pytest.raises(ImageFormatError, match="holds a volume"):
        write_labels(tmp_path / "flat.seg.nrrd", np.zeros((4, 4), np.uint8))
