"""Crash-safe corrections: a labels layer's work saved to one file that a new session can restore.

A `Session` holds what a killed napari would lose: the labels as the user left them, the model's own prediction
(so that corrected slices are still found by comparison), the slices the user painted, and which checkpoint made
the prediction. It is written atomically (the previous file stays whole until the new one is complete) as a NumPy
`.npz` without pickled objects, named after the image and a hash of its pixels, so the same image opened again
(from its file, or the demo's sample) finds it. Plain Python: the widget decides when to save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .corrections import edited_slices
from .errors import DaeformerError

SUFFIX = ".daeformer-session.npz"
ENV_FOLDER = "DAEFORMER_AUTOSAVE_DIR"          # overrides the default folder
USER_FOLDER = Path.home() / ".napari-daeformer" / "autosave"
FORMAT = 1


@dataclass
class Session:
    """One labels layer's corrections.

    Args:
        image_key: `image_key` of the image the labels belong to.
        labels: ([Z,] Y, X) the labels as the user left them.
        prediction: same shape, the model's own output (None for a layer painted from scratch).
        touched: slices (axis 0) the user painted.
    """

    image_key: str
    image_name: str
    layer_name: str
    labels: np.ndarray
    prediction: np.ndarray | None
    touched: list[int]
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    class_names: list[str] = field(default_factory=list)
    class_colors: list[str] = field(default_factory=list)
    saved_at: float = 0.0                      # seconds since the epoch

    def corrected(self) -> np.ndarray:
        """(S,) bool along axis 0: the slices the user changed or painted."""
        return edited_slices(self.labels, self.prediction, self.touched)

    def describe(self) -> str:
        """'3 corrected slices, saved 14:02:11, made by ct_small.safetensors'."""
        n = int(self.corrected().sum())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
        made = f", predicted by {self.checkpoint}" if self.checkpoint else ""
        return f"{n} corrected slice{'s' if n != 1 else ''}, saved {stamp}{made}"


def image_key(data: np.ndarray) -> str:
    """A hash of an image's pixels, shape and dtype: the same image read again has the same key."""
    a = np.ascontiguousarray(data)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{a.shape}{a.dtype.str}".encode())
    digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def default_folder(source_path: str | os.PathLike[str] | None = None) -> Path:
    """Where sessions go: $DAEFORMER_AUTOSAVE_DIR if set, else beside the image file when its folder is writable,
    else ~/.napari-daeformer/autosave."""
    if os.environ.get(ENV_FOLDER):
        return Path(os.environ[ENV_FOLDER])
    if source_path:
        folder = Path(source_path).parent                     # a file's folder; beside a DICOM series folder
        if folder.is_dir() and os.access(folder, os.W_OK):
            return folder
    return USER_FOLDER


def session_path(folder: str | os.PathLike[str], image_name: str, key: str) -> Path:
    """`folder/.NAME-KEY.daeformer-session.npz` (hidden: it sits beside the user's images)."""
    safe = re.sub(r"[^\w.-]+", "_", image_name)[:60] or "image"
    return Path(folder) / f".{safe}-{key[:16]}{SUFFIX}"


def save_session(path: str | os.PathLike[str], session: Session) -> Path:
    """Write `session` atomically (the previous file stays whole until the new one is complete)."""
    meta = {k: v for k, v in asdict(session).items() if k not in ("labels", "prediction")}
    meta["format"] = FORMAT
    meta["saved_at"] = session.saved_at or time.time()
    arrays = {"labels": np.asarray(session.labels),
              "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if session.prediction is not None:
        arrays["prediction"] = np.asarray(session.prediction)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def load_session(path: str | os.PathLike[str]) -> Session:
    """Read a session file (no pickled objects are loaded).

    Raises:
        DaeformerError: the file is missing, damaged or of another format.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            labels = z["labels"]
            prediction = z["prediction"] if "prediction" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:      # JSONDecodeError is a ValueError
        raise DaeformerError(f"{p.name}: not a readable autosaved session ({e})") from e
    if meta.pop("format", None) != FORMAT:
        raise DaeformerError(f"{p.name}: autosaved by another version of napari-daeformer")
    if prediction is not None and prediction.shape != labels.shape:
        raise DaeformerError(f"{p.name}: damaged (labels {labels.shape}, prediction {prediction.shape})")
    known = Session.__dataclass_fields__
    return Session(labels=labels, prediction=prediction, **{k: v for k, v in meta.items() if k in known})


def find_session(folders: list[Path], key: str) -> Path | None:
    """The newest session file of the image with this key in `folders` (whatever the image was called)."""
    found = [p for folder in folders if folder.is_dir() for p in folder.glob(f".*-{key[:16]}{SUFFIX}")]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
