"""Static int8 in child processes, so that the caller's threads (a viewer's event loop) keep running.

- The one-time compile (`build_in_child`): cancelling kills the child (and the compiler processes it started) at
  once. The parent hands it a job folder (the weights, the configuration and the calibration batches, written by
  torch and read back with `weights_only=True`); the child compiles into the package cache and writes its outcome
  as JSON; the parent then loads the package through the cache's checks like any other.
- The runs (`ChildInt8`): AOTInductor's runner holds the GIL for the whole of each call (a slice's forward: the
  viewer froze up to 1.2 s), so a GUI runs the verified package in a child process that reads its input from and
  writes its logits to shared memory; the parent waits on a pipe, which releases the GIL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import torch

from napari_daeformer.base.errors import Cancelled, InferenceError
from napari_daeformer.base.private_api import shared_memory_name
from napari_daeformer.engine import static_int8
from napari_daeformer.model import DAEFormer, DAEFormerConfig

POLL_SECONDS = 0.1


def build_in_child(model: DAEFormer, calibration: Sequence[torch.Tensor], batch: int, input_size: tuple[int, int],
                   cancel: threading.Event | None = None) -> tuple[static_int8.StaticInt8, float]:
    """`static_int8.build` in a child process; the same result and errors, plus Cancelled once `cancel` is set
    (the child is killed within POLL_SECONDS and leaves no package)."""
    with tempfile.TemporaryDirectory(prefix="daeformer-int8-job-") as job:
        folder = Path(job)
        torch.save({"weights": model.state_dict(), "calibration": [x.cpu() for x in calibration]},
                   folder / "job.pt")
        (folder / "job.json").write_text(json.dumps({"config": model.cfg.to_dict(), "batch": batch,
                                                     "input_size": list(input_size)}))
        with open(folder / "log.txt", "wb") as log:
            child = subprocess.Popen(_command(folder), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, start_new_session=True)
            try:
                while True:
                    try:
                        child.wait(POLL_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("int8 compile cancelled") from None
            finally:
                if child.poll() is None:
                    _kill(child)
        outcome = folder / "outcome.json"
        if not outcome.is_file():
            lines = (folder / "log.txt").read_text(errors="replace").strip().splitlines()
            raise static_int8.Unavailable(f"static int8 could not be compiled here (the compile process ended with "
                                          f"status {child.returncode}: {lines[-1] if lines else 'no message'})")
        result = json.loads(outcome.read_text())
    if "unavailable" in result:
        raise static_int8.Unavailable(result["unavailable"])
    compiled = static_int8.load(model, batch, input_size)        # through the cache's checks, as any later run
    if compiled is None:
        raise static_int8.Unavailable("static int8 was compiled but its package is missing from the cache")
    return compiled, float(result["agreement"])


def _command(job: Path) -> list[str]:
    return [sys.executable, "-m", __name__, str(job)]


def _kill(child: subprocess.Popen[bytes]) -> None:
    """Kill the child and every process of its session (inductor's compile workers, the C++ compiler)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        child.kill()
    child.wait()


class ChildInt8:
    """A verified package run in a child process: (b, C, H, W) fp32 -> (b, n, H, W) fp32 logits for any b, in
    chunks of the compiled batch (the last one zero-padded), as `static_int8.StaticInt8`."""

    def __init__(self, package: static_int8.StaticInt8, in_shape: tuple[int, int, int], classes: int) -> None:
        self.batch = package.batch
        c, h, w = in_shape
        self._in = shared_memory.SharedMemory(create=True, size=4 * self.batch * c * h * w)
        self._out = shared_memory.SharedMemory(create=True, size=4 * self.batch * classes * h * w)
        self._x = np.ndarray((self.batch, c, h, w), np.float32, self._in.buf)
        self._y = np.ndarray((self.batch, classes, h, w), np.float32, self._out.buf)
        spec = json.dumps({"package": str(package.path), "batch": self.batch, "in": [self._in.name, c, h, w],
                           "out": [self._out.name, classes]})
        self._child = subprocess.Popen([sys.executable, "-m", __name__, "--serve", spec], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._finalizer = weakref.finalize(self, _close, self._child, self._in, self._out)
        self._ask(None)                                          # the package is loaded

    def _ask(self, line: str | None) -> None:
        """Send `line` (if any), wait for the child's 'ok' (the wait releases the GIL)."""
        try:
            if line is not None:
                self._child.stdin.write(f"{line}\n".encode())   # type: ignore[union-attr]
                self._child.stdin.flush()                        # type: ignore[union-attr]
            answer = self._child.stdout.readline().decode().strip()   # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            answer = ""
        if answer != "ok":
            raise InferenceError(f"the int8 runner process stopped ({answer or f'status {self._child.poll()}'}); "
                                 "choose another precision")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in static_int8._padded([x.float()], self.batch):
            self._x[...] = chunk.numpy()
            self._ask("run")
            outputs.append(torch.from_numpy(self._y.copy()))
        return torch.cat(outputs)[:len(x)]

    def close(self) -> None:
        self._finalizer()


_RUNNER: dict[str, ChildInt8] = {}                              # the last package's runner, kept for the next run


def child_runner(package: static_int8.StaticInt8, in_shape: tuple[int, int, int], classes: int) -> ChildInt8:
    """A runner of `package` in a child process; the one made for the previous run when it is the same package
    (a runner starts in a few seconds: torch's import)."""
    key = json.dumps([str(package.path), package.batch, list(in_shape), classes])
    runner = _RUNNER.get(key)
    if runner is None or runner._child.poll() is not None:
        for old in _RUNNER.values():
            old.close()
        _RUNNER.clear()
        runner = _RUNNER[key] = ChildInt8(package, in_shape, classes)
    return runner


def _close(child: subprocess.Popen[bytes], *memory: shared_memory.SharedMemory) -> None:
    if child.poll() is None:
        child.stdin.close()                                      # type: ignore[union-attr]  # EOF: it exits
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    for m in memory:
        m.close()
        m.unlink()


def _serve(spec: dict[str, object]) -> None:
    """The runner's side: load the package, then for each 'run' line compute the batch in shared memory."""
    name_in, c, h, w = spec["in"]                                # type: ignore[misc]
    name_out, classes = spec["out"]                              # type: ignore[misc]
    batch = int(spec["batch"])                                   # type: ignore[call-overload]
    run = static_int8.StaticInt8(Path(str(spec["package"])), batch)
    shm_in, shm_out = shared_memory.SharedMemory(name_in), shared_memory.SharedMemory(name_out)
    for shm in (shm_in, shm_out):                                # the parent owns them (Python < 3.13 would unlink)
        resource_tracker.unregister(shared_memory_name(shm), "shared_memory")
    x = torch.from_numpy(np.ndarray((batch, c, h, w), np.float32, shm_in.buf))
    y = np.ndarray((batch, classes, h, w), np.float32, shm_out.buf)
    out = sys.stdout.buffer
    out.write(b"ok\n")
    out.flush()
    with torch.inference_mode():
        for line in sys.stdin.buffer:
            if line.strip() != b"run":
                break
            y[...] = run(x).numpy()
            out.write(b"ok\n")
            out.flush()
    del x, y
    shm_in.close()
    shm_out.close()


def _main(job: Path) -> None:
    spec = json.loads((job / "job.json").read_text())
    data = torch.load(job / "job.pt", weights_only=True)
    model = DAEFormer(DAEFormerConfig.from_dict(spec["config"])).eval()
    model.load_state_dict(data["weights"])
    try:
        _, agreement = static_int8.build(model, data["calibration"], spec["batch"], tuple(spec["input_size"]))
        result: dict[str, object] = {"agreement": agreement}
    except static_int8.Unavailable as e:
        result = {"unavailable": str(e)}
    (job / "outcome.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(json.loads(sys.argv[2]))
    else:
        _main(Path(sys.argv[1]))
