"""Atomic file writes: readers see the old file or the complete new one, never half of one."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

from napari_daeformer.base.errors import DaeformerError


def _umask() -> int:
    """The process's umask (read from /proc where possible: setting it to query it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = True,
                 mode: int | None = None) -> Path:
    """Call `write(tmp)` on a temporary path beside `path` (same suffix), then rename it over `path`.

    Args:
        path: the destination.
        write: writes the whole file to the path it is given.
        overwrite: if False and `path` exists, raise instead of replacing it.
        mode: the file's permission bits (default: as a plain open() would give, 0666 less the umask).
    Raises:
        DaeformerError: `path` exists and overwrite is False.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise DaeformerError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid4().hex[:8]}-{_tail(path.name)}")  # same folder and suffix
    try:
        write(tmp)
        with open(tmp, "rb+") as f:                               # data on disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)   # as a plain open() would (some writers use 0600)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path` only if nothing is there at that moment (another writer may have finished first):
    a hard link fails on an existing name, where a rename would replace it."""
    taken = DaeformerError(f"{path} already exists (written by another process meanwhile); it was kept")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError:                                       # a file system without hard links: check, then rename
        if path.exists():
            raise taken from None
        os.replace(tmp, path)


_TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}-(.+)")
NAME_MAX = 255                             # bytes in one file name on Linux, macOS and Windows file systems
_TEMP_TAIL = NAME_MAX - len(".tmp-4194304-0123abcd-")


def _tail(name: str) -> str:
    """The end of `name` that fits a temporary's name beside the prefix (the suffix, which writers read, kept):
    a 240-character name is legal, its temporary with the whole name is not."""
    encoded = os.fsencode(name)                           # undecodable bytes of a Linux name kept as they are
    return name if len(encoded) <= _TEMP_TAIL else os.fsdecode(encoded[-_TEMP_TAIL:])
STALE_SECONDS = 3600.0                     # a temporary file untouched this long belongs to no live write


def remove_stale_temporaries(folder: Path, name: str | None = None, *, recursive: bool = False) -> list[Path]:
    """Delete the hidden temporary files that killed writes left in `folder` (for `name` only, if given): those of
    a process that no longer runs on this machine, or untouched for an hour. Returns what was removed."""
    removed = []
    candidates = folder.rglob(".tmp-*") if recursive else folder.glob(".tmp-*")
    now = time.time()
    for tmp in candidates:
        m = _TEMPORARY.fullmatch(tmp.name)
        if not m or (name is not None and m.group(2) != _tail(name)):
            continue
        try:
            if _alive(int(m.group(1))) and now - tmp.stat().st_mtime < STALE_SECONDS:
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:                                   # gone already, or not ours to delete: leave it
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True                                       # exists (another user's) or unknowable: keep
    return True


def check_output_path(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse, before any work, an output that exists (unless `overwrite`), whose folder is a file, or whose
    nearest existing folder is not writable."""
    path = Path(path)
    if path.is_dir():
        raise DaeformerError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise DaeformerError(f"{path} already exists; choose another name or allow overwriting")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DaeformerError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DaeformerError(f"cannot write {path}: {folder} is not writable")
