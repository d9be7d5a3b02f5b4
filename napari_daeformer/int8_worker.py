"""The one-time static int8 compile, run in a child process: cancelling kills it (and the compiler processes it
started) at once, and the caller's process (a viewer's event loop) is not slowed by the compile's Python work.

The parent hands the child a job folder (the weights, the configuration and the calibration batches, written by
torch and read back with `weights_only=True`); the child compiles into the shared package cache and writes its
outcome as JSON; the parent then loads the package through the cache's checks like any other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from . import static_int8
from .errors import Cancelled
from .model import DAEFormer, DAEFormerConfig

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
    _main(Path(sys.argv[1]))
