"""DICOM-SEG export (highdicom): frames reference the right source instances and the mask survives voxel for voxel."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image
from napari_daeformer.io.dicom_seg import Algorithm, find_series, read_dicom_seg, write_dicom_seg
from napari_daeformer.io.sample_data import synthetic_ct

from ..conftest import write_dicom_series

NAMES = ("background", "liver", "spleen", "left kidney", "right kidney", "aorta")
COLOURS = ("#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231")


def phantom_series(folder: Path, slices: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic CT phantom (downsampled) written as a DICOM series; its HU volume and true labels."""
    sample = synthetic_ct(seed=0, shape=(slices, 128, 128))
    hu = np.clip(sample.image, -1024, 3000)
    write_dicom_series(folder, (hu + 1024).astype(np.uint16), sample.spacing)
    return hu, sample.labels


def frames_by_source(path: Path) -> dict[tuple[str, int], np.ndarray]:
    """(referenced SOP instance UID, segment number) -> frame, read with highdicom's own accessors."""
    seg = hd.seg.segread(str(path))
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    out = {}
    for frame, fg in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[(str(uid), number)] = frame
    return out


def test_written_seg_references_each_source_instance(tmp_path: Path) -> None:
    _, truth = phantom_series(tmp_path / "series")
    out = write_dicom_seg(tmp_path / "seg.dcm", truth, tmp_path / "series", NAMES, COLOURS,
                          Algorithm("ct_small.safetensors", "ab" * 32, "0.1.0"))
    import pydicom
    sources = sorted((pydicom.dcmread(str(f)) for f in (tmp_path / "series").iterdir()),
                     key=lambda ds: float(ds.ImagePositionPatient[2]))          # slice k of the volume = sources[k]
    frames = frames_by_source(out)
    for k, ds in enumerate(sources):
        for number in range(1, len(NAMES)):
            expected = truth[k] == number
            frame = frames.get((str(ds.SOPInstanceUID), number))
            if frame is None:
                assert not expected.any(), (k, number)                       # only empty frames are left out
            else:
                assert np.array_equal(frame.astype(bool), expected), (k, number)
    seg = hd.seg.segread(str(out))
    assert [d.SegmentLabel for d in seg.SegmentSequence] == list(NAMES[1:])
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "DAE-Former" and "ct_small.safetensors" in algo.AlgorithmVersion
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    back = read_dicom_seg(out, tmp_path / "series")                           # on its series
    assert np.array_equal(back.labels, truth)
    assert back.class_names == NAMES and back.class_colors == COLOURS
    np.testing.assert_allclose(back.record.affine, read_image(tmp_path / "series").affine)
    alone = read_dicom_seg(out)                                               # without it: by frame positions
    first, last = np.flatnonzero(truth.reshape(len(truth), -1).any(1))[[0, -1]]
    assert np.array_equal(alone.labels, truth[first:last + 1])
    series = read_image(tmp_path / "series")
    np.testing.assert_allclose(alone.record.spacing, series.spacing)
    np.testing.assert_allclose(alone.record.origin, np.add(series.origin, (first * series.spacing[0], 0, 0)))


def test_cli_segments_a_series_into_dicom_seg(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    phantom_series(tmp_path / "series", slices=6)
    assert main(["segment", str(tmp_path / "series"), str(tmp_path / "out.dcm"), "--device", "cpu"]) == 0
    assert find_series(tmp_path / "out.dcm") == tmp_path / "series"
    seg = read_dicom_seg(tmp_path / "out.dcm", tmp_path / "series")
    expected = tmp_path / "labels.nii.gz"
    assert main(["segment", str(tmp_path / "series"), str(expected), "--device", "cpu"]) == 0
    assert np.array_equal(seg.labels, read_image(expected).data)              # the same labels as the NIfTI output
    algo = hd.seg.segread(str(tmp_path / "out.dcm")).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmVersion.startswith("ct_small.safetensors sha256:")
    capsys.readouterr()
    assert main(["segment", str(expected), str(tmp_path / "x.dcm")]) == 2        # NIfTI in: no series to reference
    assert "references a DICOM series" in capsys.readouterr().err


def test_shape_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    phantom_series(tmp_path / "series", slices=4)
    with pytest.raises(ImageFormatError, match="do not match the DICOM series"):
        write_dicom_seg(tmp_path / "seg.dcm", np.zeros((3, 128, 128), np.uint8), tmp_path / "series", NAMES, COLOURS,
                        Algorithm("m.safetensors", ""))
    assert not (tmp_path / "seg.dcm").exists()
