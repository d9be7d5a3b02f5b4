"""One writer per output folder: an advisory lock (flock) that a second `daeformer batch` on the same folder meets
at the start, before any work, instead of both reporting success over each other's files and summary.

The lock file lives in a folder others may write, so it is opened as a hostile path: never through a link
(O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK), and written only when it is a regular file of ours, with one
name, that holds nothing but a pid: a planted link, FIFO, device, hard link or foreign file is refused untouched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from napari_daeformer.base.errors import DaeformerError, printable

try:
    import fcntl
except ImportError:                                   # Windows: no flock; a second writer is not detected there
    fcntl = None  # type: ignore[assignment]

_MAX_LOCK_BYTES = 20                                  # a pid in decimal
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _refuse(path: Path, what: str) -> DaeformerError:
    return DaeformerError(f"{path}: {what}, not a lock file of daeformer's; it was left untouched: remove it "
                          "or choose another output folder")


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file at `path`, created if absent; refuses (DaeformerError) anything else there."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        before = None
    except OSError as e:
        raise DaeformerError(f"{path.parent}: cannot write there ({e.strerror}); choose another output folder") from e
    if before is not None and not stat.S_ISREG(before.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(before.st_mode) else "a FIFO" if stat.S_ISFIFO(before.st_mode) \
            else "not a regular file"
        raise _refuse(path, f"is {kind}")
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as e:
        if os.path.islink(path):                      # planted between the look and the open (ELOOP)
            raise _refuse(path, "is a symbolic link") from None
        raise DaeformerError(f"{path.parent}: cannot write there ({e.strerror}); choose another output folder") from e
    try:
        _check_ours(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_ours(path: Path, st: os.stat_result) -> None:
    """Refuse a file that is not a regular, singly linked file of this user's holding at most a pid."""
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise _refuse(path, f"belongs to another user (uid {st.st_uid})")
    if st.st_nlink != 1:
        raise _refuse(path, f"has {st.st_nlink} names (a hard link to another file)")
    if st.st_size > _MAX_LOCK_BYTES:
        raise _refuse(path, f"holds {st.st_size} bytes")


@contextmanager
def exclusive(folder: Path, name: str) -> Iterator[None]:
    """Hold `folder/.NAME.lock` (creating the folder) while the block runs; the lock goes with the process, so a
    killed run never leaves the folder locked.

    Raises:
        DaeformerError: another process holds it (its pid is named), the folder cannot be written, or something
            other than our own lock file lies at that name (a link, a FIFO, another user's or a non-empty file).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DaeformerError(f"{folder}: cannot write there ({e.strerror}); choose another output folder") from e
    path = folder / f".{name}.lock"
    fd = _open_lock(path)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = printable(os.pread(fd, _MAX_LOCK_BYTES, 0).decode(errors="replace").strip()) or "?"
                raise DaeformerError(f"{folder}: another daeformer batch (pid {holder}) is writing "
                                     "to this folder; wait for it to finish or choose another output folder") from None
            content = os.pread(fd, _MAX_LOCK_BYTES + 1, 0)
            if content.strip() and not content.strip().isdigit():
                raise _refuse(path, "holds something other than a pid")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
