"""The batch lock in a folder others can write: whatever is planted at its name (a link to the user's thesis, a
FIFO, a hard link, a foreign file) is refused in one line and left byte for byte as it was; our own stale lock is
taken over."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.base.folder_lock import exclusive

THESIS = b"\\documentclass{article} my thesis, five years of it\n"


def _planted(out: Path, kind: str, victim: Path) -> Path:
    out.mkdir()
    lock = out / ".batch-rank0.lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling symlink":
        lock.symlink_to(out.parent / "created-by-the-batch")
    elif kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    elif kind == "foreign content":
        lock.write_bytes(b"not a pid: something the user keeps\n")
    return lock


@pytest.mark.parametrize(("kind", "message"), [
    ("symlink", "is a symbolic link"), ("dangling symlink", "is a symbolic link"),
    ("hard link", "has 2 names"), ("fifo", "is a FIFO"), ("folder", "is not a regular file"),
    ("foreign content", "holds 36 bytes")])
def test_a_planted_lock_is_refused_and_nothing_is_touched(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          kind: str, message: str) -> None:
    victim = tmp_path / "thesis.tex"
    victim.write_bytes(THESIS)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    np.save(src / "ignored.npy", np.zeros(2))
    lock = _planted(out, kind, victim)
    assert main(["batch", str(src), str(out), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "not a lock file of daeformer's" in err, err
    assert victim.read_bytes() == THESIS
    assert not (tmp_path / "created-by-the-batch").exists()
    assert os.path.lexists(lock) and sorted(p.name for p in out.iterdir()) == [lock.name]


def test_another_users_lock_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".batch-rank0.lock").write_text("12")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(DaeformerError, match="belongs to another user"), exclusive(tmp_path, "batch-rank0"):
        pass
    assert (tmp_path / ".batch-rank0.lock").read_text() == "12"


def test_our_stale_lock_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".batch-rank0.lock"
    lock.write_text("4194303")                             # a killed run's pid
    with exclusive(tmp_path, "batch-rank0"):
        assert lock.read_text() == str(os.getpid())
    with exclusive(tmp_path, "batch-rank0"):               # and again, once released
        pass
    with exclusive(tmp_path / "new", "batch-rank0"):
        assert (tmp_path / "new" / ".batch-rank0.lock").stat().st_mode & 0o777 == 0o600
