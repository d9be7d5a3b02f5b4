"""Atomic writes: a write that must not replace a file checks at the moment it lands, not before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import DaeformerError


def test_a_second_writer_that_finishes_first_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "mask.nii.gz"

    def slow_write(tmp: Path) -> None:               # while we write, another process lands its file
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(DaeformerError, match="written by another process meanwhile"):
        atomic_write(target, slow_write, overwrite=False)
    assert target.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"ours"))            # overwrite allowed: replaced
    assert target.read_bytes() == b"ours"


def test_a_long_legal_name_is_written(tmp_path: Path) -> None:
    """A 245-character name failed only because its temporary's prefix made it longer than a name may be."""
    target = tmp_path / ("x" * 238 + ".nii.gz")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"labels"))
    assert target.read_bytes() == b"labels" and [p.name for p in tmp_path.iterdir()] == [target.name]
