"""Crafted NRRD and .seg.nrrd files: a gzip bomb, absurd or malformed segment fields, a detached header reaching
for a file elsewhere, spacings that are no sizes. Each is one line naming the file (or a note), never a traceback,
and never more memory than the header declares."""

from __future__ import annotations

import bz2
import gzip
import re
import resource
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import ImageFormatError
from napari_daeformer.io import read_image

HEADER = "NRRD0004\ntype: int16\nendian: little\ndimension: 3\nsizes: 96 96 4\nencoding: {encoding}\n{extra}\n"


def _bomb(path: Path, encoding: str, inflated: int) -> Path:
    zeros = b"\0" * inflated
    payload = gzip.compress(zeros, 9) if encoding == "gzip" else bz2.compress(zeros, 9)
    path.write_bytes(HEADER.format(encoding=encoding, extra="").encode() + payload)
    return path


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_compression_bomb_stops_at_the_declared_size(tmp_path: Path, encoding: str) -> None:
    bomb = _bomb(tmp_path / "bomb.nrrd", encoding, 256 * 2**20)        # 72 KB declared, 256 MB inflated
    assert bomb.stat().st_size < 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ImageFormatError, match="bomb.nrrd: the compressed data inflates beyond the 72.0 KB"):
        read_image(bomb)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024   # KB: far below 256 MB


def test_the_declared_size_still_reads(tmp_path: Path) -> None:
    data = np.arange(4 * 96 * 96, dtype=np.int16).reshape(4, 96, 96)
    for encoding in ("gzip", "bzip2", "raw", "ascii"):
        nrrd.write(str(tmp_path / f"{encoding}.nrrd"), data, {"encoding": encoding, "spacings": [0.5, 0.5, 3]},
                   index_order="C")
        record = read_image(tmp_path / f"{encoding}.nrrd")
        assert np.array_equal(record.data, data) and record.spacing == (3.0, 0.5, 0.5) and not record.notes
    nrrd.write(str(tmp_path / "detached.nhdr"), data, {"encoding": "gzip"}, detached_header=True, index_order="C")
    assert np.array_equal(read_image(tmp_path / "detached.nhdr").data, data)     # data file beside its header


@pytest.mark.parametrize("target", ["/etc/hostname", "../secret.raw", "sub/secret.raw", "link.raw"])
def test_a_detached_header_reads_only_beside_itself(tmp_path: Path, target: str) -> None:
    (tmp_path / "secret.raw").write_bytes(b"\1" * (96 * 96 * 4 * 2))
    folder = tmp_path / "case"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "secret.raw").write_bytes(b"\1" * (96 * 96 * 4 * 2))
    (folder / "link.raw").symlink_to(tmp_path / "secret.raw")
    (folder / "scan.nhdr").write_text(HEADER.format(encoding="raw", extra=f"data file: {target}\n"))
    with pytest.raises(ImageFormatError, match="scan.nhdr: its data file .* beside the header"):
        read_image(folder / "scan.nhdr")


SEG = "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 2\nencoding: raw\nSegment0_Name:=liver\n{field}\n\n"


@pytest.mark.parametrize(("field", "message"), [
    ("Segment0_LabelValue:=100000000", "Segment0_LabelValue 100000000 is not a label value (1..65535)"),
    ("Segment0_LabelValue:=abc", "Segment0_LabelValue 'abc' is not a whole number"),
    ("Segment0_Layer:=x", "Segment0_Layer 'x' is not a whole number"),
    ("Segment0_Color:=nan nan nan", "Segment0_Color 'nan nan nan' is not three numbers from 0 to 1"),
    ("Segment0_Color:=red", "Segment0_Color 'red' is not three numbers from 0 to 1"),
])
def test_segment_fields_that_are_no_values_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        field: str, message: str) -> None:
    seg = tmp_path / "organs.seg.nrrd"
    seg.write_bytes(SEG.format(field=field).encode() + b"\1" * 128)
    start = time.perf_counter()
    with pytest.raises(ImageFormatError, match=re.escape(f"organs.seg.nrrd: {message}")):
        read_image(seg)
    assert time.perf_counter() - start < 1
    image = tmp_path / "ct.nrrd"
    nrrd.write(str(image), np.zeros((2, 8, 8), np.int16), index_order="C")
    for command in (["segment", str(seg), str(tmp_path / "out.nii.gz")],
                    ["train", "--image", str(image), "--labels", str(seg), "--classes", "background,liver",
                     "--out", str(tmp_path / "run")],
                    ["finetune", "--model", "ct", "--image", str(image), "--labels", str(seg),
                     "--out", str(tmp_path / "ft.safetensors")]):
        assert main([*command, "--device", "cpu"]) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_spacings_that_are_no_sizes_are_noted(tmp_path: Path) -> None:
    (tmp_path / "nan.nrrd").write_bytes(HEADER.format(encoding="raw", extra="spacings: nan nan nan\n").encode()
                                        + b"\0" * (96 * 96 * 4 * 2))
    record = read_image(tmp_path / "nan.nrrd")
    assert record.spacing == (1.0, 1.0, 1.0)
    assert record.notes == ("spacings nan nan nan are not 3 positive sizes: read as 1 per voxel; volumes are in "
                            "voxels of that size, not mm",)
