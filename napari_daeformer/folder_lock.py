"""One writer per output folder: an advisory lock (flock) that a second `daeformer batch` on the same folder meets
at the start, before any work, instead of both reporting success over each other's files and summary."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DaeformerError

try:
    import fcntl
except ImportError:                                   # Windows: no flock; a second writer is not detected there
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive(folder: Path, name: str) -> Iterator[None]:
    """Hold `folder/.NAME.lock` (creating the folder) while the block runs; the lock goes with the process, so a
    killed run never leaves the folder locked.

    Raises:
        DaeformerError: another process holds it (its pid is named), or the folder cannot be written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise DaeformerError(f"{folder}: cannot write there ({e.strerror}); choose another output folder") from e
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
                raise DaeformerError(f"{folder}: another daeformer batch (pid {holder}) is writing to this folder; "
                                     "wait for it to finish or choose another output folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
