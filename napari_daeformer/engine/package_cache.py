"""The on-disk cache of compiled int8 packages, trusting only what this user made from these weights.

A package is native code: loading it runs it. So the cache folder is created 0700, and it, every folder above it
and every file read from it must be owned by this user (or root, for the folders above) and writable by no one
else (a sticky folder such as /tmp excepted above it). Beside each package a manifest records the SHA-256 of the
package's bytes and of the weights it was built from; a package is loaded only when both match, so a package
planted or copied to another model's key is refused and a truncated one is deleted (and made again).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import DaeformerError, printable

CACHE_ENV = "DAEFORMER_CACHE"
_PRIVATE = 0o600


class UntrustedCache(DaeformerError):
    """The cache folder or a file in it could have been written by another user; nothing in it is loaded."""


def cache_folder() -> Path:
    """Where compiled packages live: $DAEFORMER_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-daeformer" / "int8"


def _owner_ok(st: os.stat_result, allow_root: bool) -> bool:
    return st.st_uid == os.geteuid() or (allow_root and st.st_uid == 0)


def private_folder() -> Path:
    """The cache folder, created 0700 if missing. Raises UntrustedCache unless it and each folder above it are
    owned by this user (root too, above it) and writable by no one else (above it: unless sticky, as /tmp)."""
    folder = cache_folder().absolute()
    for missing in reversed([f for f in [folder, *folder.parents] if not os.path.lexists(f)]):
        try:
            missing.mkdir(mode=0o700)                     # not 0777 less the umask: with umask 000, that is open
        except FileExistsError:
            pass
    for i, f in enumerate([folder, *folder.parents]):
        st = os.lstat(f)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(f)                                   # a link is as safe as its target (and its folder, below)
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedCache(f"the int8 cache {folder} is not a folder")
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not _owner_ok(st, allow_root=i > 0) or (writable_by_others and (i == 0 or not st.st_mode & stat.S_ISVTX)):
            raise UntrustedCache(f"the int8 cache {folder} is not private to you ({f} is owned by uid {st.st_uid}, "
                                 f"mode {stat.S_IMODE(st.st_mode):o}); compiled packages are only loaded from a "
                                 f"folder only you can write (chmod 700, or set {CACHE_ENV})")
    return folder


def _trusted_file(path: Path) -> bool:
    """False if `path` is missing; True if it is a plain file of this user's that no one else can write.
    Raises UntrustedCache for anything else (a link, another user's file, a group- or world-writable one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or not _owner_ok(st, allow_root=False) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(f"refusing {path}: not a plain file of yours that only you can write (it is never loaded; "
                             f"delete it)")
    return True


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict (names and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(key: str) -> tuple[Path, Path, Path]:
    folder = private_folder()
    return folder / f"{key}.pt2", folder / f"{key}.json", folder / f"{key}.rejected.json"


def lookup(key: str, weights: str) -> Path | None:
    """The verified package stored under `key` for weights of digest `weights`, or None if there is none (a damaged
    or stale one is deleted first). Raises UntrustedCache for a file another user could have written, or a package
    recorded as built from other weights."""
    package, manifest, _ = _paths(key)
    if not _trusted_file(package) or not _trusted_file(manifest):
        return None                                           # not made yet (or its manifest not written yet)
    try:
        record = json.loads(manifest.read_text())
        recorded = (record["key"], record["weights_sha256"], record["package_sha256"])
    except (ValueError, KeyError, TypeError):
        recorded = None
    if recorded is not None and recorded[:2] != (key, weights):
        raise UntrustedCache(f"refusing {package}: it was not built from this model's weights (never loaded; delete it)")
    if recorded is None or recorded[2] != _file_digest(package):   # torn or truncated: make it again
        discard(key)
        return None
    return package


def store(key: str, weights: str, write: Callable[[Path], None]) -> Path:
    """Write a package under `key` atomically through `write(tmp)`, readable and writable by this user only, then
    its manifest binding it to `weights` and its own bytes."""
    package, manifest, _ = _paths(key)
    atomic_write(package, write, mode=_PRIVATE)
    record = {"key": key, "weights_sha256": weights, "package_sha256": _file_digest(package)}
    atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(record)), mode=_PRIVATE)
    return package


def discard(key: str) -> None:
    """Delete the package and manifest stored under `key`."""
    package, manifest, _ = _paths(key)
    package.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)


def rejection(key: str) -> str | None:
    """Why the package for `key` was refused before (None if it was not)."""
    rejected = _paths(key)[2]
    if not _trusted_file(rejected):
        return None
    try:
        return printable(str(json.loads(rejected.read_text())["reason"]))   # never a terminal escape
    except (ValueError, KeyError, TypeError):
        rejected.unlink()
        return None


def reject(key: str, reason: str) -> None:
    """Remember that the package for `key` was refused, and why."""
    discard(key)
    atomic_write(_paths(key)[2], lambda tmp: tmp.write_text(json.dumps({"reason": reason})), mode=_PRIVATE)
