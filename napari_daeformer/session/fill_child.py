"""The child process that fills between slices for a viewer (`fill.fill_in_child`), started as `python -m` so
that it never runs the user's script again (multiprocessing's spawn re-imports `__main__`, and a script that opens
napari at its top level would open it again). A request is three arrays in `.npy` format on the child's stdin
(labels, painted flags, the axis); the answer on its stdout is `ok` and the filled labels, or `no` and the refusal's
message. Arrays only: nothing is unpickled on either side."""

from __future__ import annotations

import subprocess
import sys
from typing import IO

import numpy as np

from napari_daeformer.session.fill import FillError, fill_between


class _Stream:
    """A pipe as numpy's `.npy` format sees a stream: read and write only (on a real file numpy seeks, which a pipe
    cannot)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if n > 0 and len(data) < n:
            raise EOFError("the other side closed the pipe")
        return data

    def write(self, data: bytes) -> int:
        return self.raw.write(data)


def _read(stream: IO[bytes]) -> np.ndarray:
    return np.lib.format.read_array(_Stream(stream), allow_pickle=False)


def _write(stream: IO[bytes], array: np.ndarray) -> None:
    np.lib.format.write_array(_Stream(stream), np.require(array, requirements="C"), allow_pickle=False)


class FillChild:
    """One child process, one request at a time (the caller holds a lock)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def fill(self, labels: np.ndarray, painted: np.ndarray, axis: int) -> np.ndarray:
        """`fill_between(labels, painted, axis)` in the child; its refusal as the same FillError."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            for array in (labels, painted, np.array(axis)):
                _write(self.process.stdin, array)
            self.process.stdin.flush()
            status = self.process.stdout.read(2)
            answer = _read(self.process.stdout)
        except (OSError, EOFError, ValueError):
            self.process.kill()
            raise FillError("the fill's helper process stopped; try again") from None
        if status != b"ok":
            raise FillError(str(answer))
        return answer


def main() -> None:
    """Serve requests until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            labels, painted, axis = _read(stdin), _read(stdin), int(_read(stdin))
        except (EOFError, ValueError):
            return
        try:
            filled, status = fill_between(labels, painted, axis), b"ok"
        except FillError as e:
            filled, status = np.array(str(e)), b"no"
        stdout.write(status)
        _write(stdout, filled)
        stdout.flush()


if __name__ == "__main__":
    main()
