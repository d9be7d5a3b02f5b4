"""One labels layer's annotation session, and its autosaved file. Plain Python: no Qt, no napari.

An `Annotation` is everything a labels layer's corrections mean beyond its pixels: the image it belongs to (its
pixel hash, fixed when the run starts), the model proposal and the checkpoint that made it, the slices the user
painted along each axis, and the classes. `corrected(labels, axis)` is the one definition of a corrected slice.

Its serialised form is the autosaved session: `.IMAGE-IMAGEKEY-ID.daeformer-session.npz`, keyed by the image and
by the annotation's own id, so two labels layers on one image, or a new run beside an unrestored session, never
share (or overwrite) a file. Written atomically as `.npz` without pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import numpy as np

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import DaeformerError, short_repr
from napari_daeformer.base.private_api import paint_slices

SUFFIX = ".daeformer-session.npz"
ENV_FOLDER = "DAEFORMER_AUTOSAVE_DIR"          # overrides the default folder
USER_FOLDER = Path.home() / ".napari-daeformer" / "autosave"
FORMAT = 2                                      # 1: one session per image, touched slices along axis 0 only
MAX_SESSION_BYTES = 4 << 30                     # an uncompressed session larger than this is refused unread
MAX_META_BYTES = 1 << 20                        # the JSON description of a session
_BYTES_PER_VOXEL = 4                            # labels and proposal, up to uint16 each


@dataclass(frozen=True)
class ImageIdentity:
    """The image an annotation belongs to: `key` hashes its pixels, so the same image read again matches."""

    key: str
    name: str
    source_path: str = ""


def image_key(data: np.ndarray) -> str:
    """A hash of an image's pixels, shape and dtype: the same image read again has the same key."""
    a = np.ascontiguousarray(data)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{a.shape}{a.dtype.str}".encode())
    digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def _per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != axis % mask.ndim)
    return mask.any(axis=other)


def changed_slices(labels: np.ndarray, proposal: np.ndarray, axis: int = 0) -> np.ndarray:
    """(S,) bool along `axis`: slices where `labels` differ from `proposal` (a 2D map is one slice)."""
    if labels.ndim == 2:
        labels, proposal, axis = labels[None], proposal.reshape((1, *labels.shape)), 0
    if proposal.shape != labels.shape:
        raise ValueError(f"proposal {proposal.shape} and labels {labels.shape} differ in shape")
    return _per_slice(labels != proposal, axis)


def merge_slices(base: np.ndarray, new: np.ndarray, replace: np.ndarray, axis: int = 0) -> np.ndarray:
    """A copy of `base` whose slices along `axis` flagged in `replace` (S,) bool come from `new`."""
    merged = np.array(base, copy=True)
    np.moveaxis(merged, axis, 0)[replace] = np.moveaxis(new, axis, 0)[replace]
    return merged


@dataclass(kw_only=True)
class Annotation:
    """The meaning of one labels layer's pixels.

    Args:
        image: the image the labels belong to.
        layer_name: the labels layer's name when it was made.
        prediction: ([Z,] Y, X) the model's proposal (None for labels painted from scratch).
        checkpoint / checkpoint_sha256 / checkpoint_path: the model that made the proposal.
        touched: axis -> slices along it the user painted.
        id: this annotation's own identity (its autosaved file's name carries it).
    """

    image: ImageIdentity
    layer_name: str
    class_names: tuple[str, ...] = ()
    class_colors: tuple[str, ...] = ()
    prediction: np.ndarray | None = None
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    checkpoint_path: str = ""
    touched: dict[int, set[int]] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid4().hex)

    def paint(self, atom: object, axis: int, ndim: int) -> None:
        """Record a paint/fill/erase history atom made while viewing slices along `axis` (a 2D map: slice 0)."""
        slices = paint_slices(atom, axis) if ndim == 3 else {0}
        self.touched.setdefault(axis if ndim == 3 else 0, set()).update(slices)

    def corrected(self, labels: np.ndarray, axis: int = 0) -> np.ndarray:
        """(S,) bool along `axis`: slices that differ from the proposal or that the user painted along `axis`;
        without a proposal (painted from scratch), the slices holding any label. A 2D map is one slice."""
        if labels.ndim == 2:
            labels, axis = labels[None], 0
        if self.prediction is None:
            return _per_slice(labels != 0, axis)
        changed = changed_slices(labels, self.prediction.reshape(labels.shape), axis)
        for z in self.touched.get(axis, ()):
            if 0 <= z < len(changed):
                changed[z] = True
        return changed

    def painted(self, labels: np.ndarray, axis: int = 0) -> np.ndarray:
        """(S,) bool along `axis`: the corrected slices, and every slice a brush touched along `axis` (one painted
        all background says "nothing here": it counts too)."""
        out = self.corrected(labels, axis)
        for z in self.touched.get(axis, ()):
            if 0 <= z < len(out):
                out[z] = True
        return out

    def painted_axis(self) -> int:
        """The axis the user painted the most slices along (0 before any painting)."""
        return max(sorted(self.touched), key=lambda axis: len(self.touched[axis]), default=0)

    def proposed(self, labels: np.ndarray, written: np.ndarray | None = None, axis: int = 0) -> None:
        """A run's labels became the proposal (on the slices `written` (S,) bool along `axis`, if given)."""
        if written is None or self.prediction is None:
            self.prediction = np.array(labels, copy=True)
        else:
            self.prediction = merge_slices(self.prediction, labels, written, axis)

    def describe(self, labels: np.ndarray) -> str:
        """'3 corrected slices, predicted by ct_small.safetensors'."""
        n = int(self.corrected(labels).sum())
        made = f", predicted by {self.checkpoint}" if self.checkpoint else ""
        return f"{n} corrected slice{'s' if n != 1 else ''}{made}"


@dataclass
class SavedSession:
    """An autosaved annotation with its labels, as read back from its file."""

    annotation: Annotation
    labels: np.ndarray
    saved_at: float
    path: Path

    def describe(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_at))
        return f"{self.annotation.describe(self.labels)}, saved {stamp}"


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


def session_path(folder: str | os.PathLike[str], annotation: Annotation) -> Path:
    """`folder/.NAME-IMAGEKEY-ID.daeformer-session.npz` (hidden: it sits beside the user's images)."""
    safe = re.sub(r"[^\w.-]+", "_", annotation.image.name)[:60] or "image"
    return Path(folder) / f".{safe}-{annotation.image.key[:16]}-{annotation.id[:12]}{SUFFIX}"


def save_session(path: str | os.PathLike[str], annotation: Annotation, labels: np.ndarray) -> Path:
    """Write the annotation and its labels atomically (the previous file stays whole until the new one is)."""
    meta = {"format": FORMAT, "saved_at": time.time(), "id": annotation.id, "layer_name": annotation.layer_name,
            "image": {"key": annotation.image.key, "name": annotation.image.name,
                      "source_path": annotation.image.source_path},
            "class_names": list(annotation.class_names), "class_colors": list(annotation.class_colors),
            "checkpoint": annotation.checkpoint, "checkpoint_sha256": annotation.checkpoint_sha256,
            "checkpoint_path": annotation.checkpoint_path,
            "touched": {str(axis): sorted(int(z) for z in zs) for axis, zs in annotation.touched.items()}}
    arrays = {"labels": np.asarray(labels), "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if annotation.prediction is not None:
        arrays["prediction"] = np.asarray(annotation.prediction)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def _checked_sizes(z: np.lib.npyio.NpzFile, name: str, voxels: int | None) -> None:
    """Refuse, before decompressing, a session whose members claim more than its image's labels and proposal
    could need (`voxels`: the image's voxel count), or MAX_SESSION_BYTES: a zip bomb."""
    total = sum(info.file_size for info in z.zip.infolist())
    limit = MAX_SESSION_BYTES if voxels is None else min(MAX_SESSION_BYTES, _BYTES_PER_VOXEL * voxels + (1 << 20))
    if total > limit:
        raise DaeformerError(f"{name}: claims {total / 2**20:.1f} MiB uncompressed, more than labels of this image "
                             "need; not an autosaved session of ours")


def _label_member(z: np.lib.npyio.NpzFile, key: str, name: str) -> np.ndarray:
    """Member `key` read as a label map: its .npy header checked first (whole-number type, 2 or 3 axes, no more
    elements than the member's bytes hold), so a 200-byte header claiming 9 TiB is refused unallocated."""
    info = z.zip.getinfo(f"{key}.npy")
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in header:
            raise DaeformerError(f"{name}: its {key} are in .npy format {version}, which we never write")
        shape, fortran, dtype = header[version](f)              # the header only; nothing allocated yet
    if dtype.kind not in "iu" or len(shape) not in (2, 3) or fortran:
        raise DaeformerError(f"{name}: its {key} are {dtype} of {len(shape)} axes, not a label map; not an "
                             "autosaved session of ours")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
        raise DaeformerError(f"{name}: its {key} claim {shape} voxels, more than the file holds; damaged")
    return z[key]


def load_session(path: str | os.PathLike[str], voxels: int | None = None) -> SavedSession:
    """Read a session file (no pickled objects are loaded); `voxels`: the image's voxel count, bounding what the
    file may decompress to.

    Raises:
        DaeformerError: the file is missing, damaged, of another format or implausibly large.
    """
    p = Path(path)
    try:
        if p.is_symlink():
            raise DaeformerError(f"{p.name}: is a link; an autosaved session is a file of its own")
        with np.load(p, allow_pickle=False) as z:
            _checked_sizes(z, p.name, voxels)
            if z.zip.getinfo("meta.npy").file_size > MAX_META_BYTES:
                raise DaeformerError(f"{p.name}: its description is over {MAX_META_BYTES >> 10} KiB; not ours")
            meta = json.loads(bytes(z["meta"]).decode())
            labels = _label_member(z, "labels", p.name)
            prediction = _label_member(z, "prediction", p.name) if "prediction" in z.files else None
        fmt = meta.get("format")
        if fmt not in (1, FORMAT):
            raise DaeformerError(f"{p.name}: autosaved by another version of napari-daeformer")
        if fmt == 1:                                             # one session per image, axis 0 only
            image = ImageIdentity(str(meta["image_key"]), str(meta["image_name"]))
            touched = {0: {int(z) for z in meta.get("touched", [])}}
            ident = uuid4().hex
        else:
            image = ImageIdentity(str(meta["image"]["key"]), str(meta["image"]["name"]),
                                  str(meta["image"].get("source_path", "")))
            touched = {int(axis): {int(z) for z in zs} for axis, zs in meta.get("touched", {}).items()}
            ident = str(meta["id"])
        annotation = Annotation(image=image, layer_name=str(meta.get("layer_name", "")),
                                class_names=tuple(map(str, meta.get("class_names", []))),
                                class_colors=tuple(map(str, meta.get("class_colors", []))), prediction=prediction,
                                checkpoint=str(meta.get("checkpoint", "")), checkpoint_sha256=str(meta.get("checkpoint_sha256", "")),
                                checkpoint_path=str(meta.get("checkpoint_path", "")), touched=touched, id=ident)
        saved_at = float(meta.get("saved_at", 0.0))
    except DaeformerError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile, zlib.error,
            MemoryError, RecursionError) as e:
        raise DaeformerError(f"{p.name}: not a readable autosaved session "
                             f"({type(e).__name__}: {short_repr(str(e), 120)})") from e
    if prediction is not None and prediction.shape != labels.shape:
        raise DaeformerError(f"{p.name}: damaged (labels {labels.shape}, prediction {prediction.shape})")
    return SavedSession(annotation, labels, saved_at, p)


def find_sessions(folders: list[Path], key: str) -> list[Path]:
    """The session files of the image with this key in `folders`, newest first (whatever the image was called).
    Only the user's own: a session another user left in a shared image folder is never offered as one's own
    corrections."""
    found = {p for folder in folders if folder.is_dir() for p in folder.glob(f".*-{key[:16]}*{SUFFIX}")
             if not p.is_symlink() and _mine(p)}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _mine(path: Path) -> bool:
    """Whether the current user owns `path` (always true where the system has no owners)."""
    return not hasattr(os, "geteuid") or path.stat().st_uid == os.geteuid()
