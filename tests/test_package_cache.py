"""The int8 package cache loads only packages this user compiled from these weights: a planted, foreign, shared,
linked, copied or truncated file is never handed to AOTInductor (whose loading runs the package's native code)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_daeformer.base.jobs import drain
from napari_daeformer.engine import package_cache, probes, static_int8
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.checkpoint import load_checkpoint

from .conftest import TINY

SIZE = (64, 64)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")


@pytest.fixture
def never_loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path handed to AOTInductor's loader (which would run the package's code): none may be."""
    loaded: list[str] = []

    def record(path: str, *args: object, **kwargs: object) -> None:
        loaded.append(path)
        raise AssertionError(f"a package was loaded: {path}")
    monkeypatch.setattr(torch._inductor, "aoti_load_package", record)
    monkeypatch.setattr(probes, "static_int8_unavailable", lambda building=True: None)
    return loaded


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "int8"
    monkeypatch.setenv(package_cache.CACHE_ENV, str(folder))
    return folder


def key_of(model: DAEFormer) -> str:
    return static_int8.package_key(model, 2, SIZE)


def plant(model: DAEFormer, payload: bytes = b"PK\x03\x04 wrapper.so with a constructor") -> Path:
    """A 'package' at `model`'s key, as an attacker would place it (no manifest)."""
    path = package_cache.private_folder() / f"{key_of(model)}.pt2"
    path.write_bytes(payload)
    return path


def other_model() -> DAEFormer:
    torch.manual_seed(1)
    return DAEFormer(TINY).eval()


def test_the_folder_is_created_private_even_at_umask_0(cache: Path) -> None:
    old = os.umask(0)
    try:
        assert package_cache.private_folder() == cache.absolute()
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_a_planted_package_without_a_manifest_is_never_loaded(tiny_model: DAEFormer, cache: Path,
                                                              never_loaded: list[str]) -> None:
    plant(tiny_model)
    assert static_int8.load(tiny_model, 2, SIZE) is None and never_loaded == []


def test_a_package_of_other_weights_at_this_key_is_refused(tiny_model: DAEFormer, cache: Path,
                                                          never_loaded: list[str]) -> None:
    """A genuine package and manifest of another model, copied to this model's key, is refused by name."""
    other = other_model()
    made = package_cache.store(key_of(other), package_cache.weights_digest(other),
                               lambda tmp: tmp.write_bytes(b"a package of other weights"))
    shutil.copy(made, cache / f"{key_of(tiny_model)}.pt2")
    shutil.copy(made.with_suffix(".json"), cache / f"{key_of(tiny_model)}.json")
    with pytest.raises(static_int8.Unavailable, match="not built from this model's weights"):
        static_int8.load(tiny_model, 2, SIZE)
    assert never_loaded == []


def test_a_truncated_package_is_deleted_so_that_it_is_made_again(tiny_model: DAEFormer, cache: Path,
                                                                 never_loaded: list[str]) -> None:
    path = package_cache.store(key_of(tiny_model), package_cache.weights_digest(tiny_model),
                               lambda tmp: tmp.write_bytes(b"x" * 1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open(path, "r+b") as f:
        f.truncate(500)
    assert static_int8.load(tiny_model, 2, SIZE) is None and never_loaded == []
    assert not path.exists() and not path.with_suffix(".json").exists()


@pytest.mark.parametrize("damage", ["world-writable", "group-writable", "symlink"])
def test_a_package_others_could_have_written_is_refused(tiny_model: DAEFormer, cache: Path, never_loaded: list[str],
                                                        tmp_path: Path, damage: str) -> None:
    path = package_cache.store(key_of(tiny_model), package_cache.weights_digest(tiny_model),
                               lambda tmp: tmp.write_bytes(b"package"))
    if damage == "symlink":
        elsewhere = tmp_path / "elsewhere.pt2"
        path.rename(elsewhere)
        path.symlink_to(elsewhere)
    else:
        path.chmod(0o666 if damage == "world-writable" else 0o620)
    with pytest.raises(static_int8.Unavailable, match="not a plain file of yours"):
        static_int8.load(tiny_model, 2, SIZE)
    assert never_loaded == []


@needs_root
def test_another_users_package_or_folder_is_refused(tiny_model: DAEFormer, cache: Path,
                                                    never_loaded: list[str]) -> None:
    path = package_cache.store(key_of(tiny_model), package_cache.weights_digest(tiny_model),
                               lambda tmp: tmp.write_bytes(b"package"))
    os.chown(path, 65534, 65534)
    with pytest.raises(static_int8.Unavailable, match="not a plain file of yours"):
        static_int8.load(tiny_model, 2, SIZE)
    os.chown(path, 0, 0)
    os.chown(cache, 65534, 65534)
    with pytest.raises(static_int8.Unavailable, match="not private to you"):
        static_int8.load(tiny_model, 2, SIZE)
    assert never_loaded == []


def test_a_shared_folder_is_refused_and_a_sticky_one_above_it_is_not(tiny_model: DAEFormer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     never_loaded: list[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(package_cache.CACHE_ENV, str(shared))
    plant_path = shared / f"{key_of(tiny_model)}.pt2"
    plant_path.write_bytes(b"planted")
    with pytest.raises(static_int8.Unavailable, match="not private to you"):
        static_int8.load(tiny_model, 2, SIZE)
    monkeypatch.setenv(package_cache.CACHE_ENV, str(shared / "mine"))          # below a world-writable folder
    with pytest.raises(package_cache.UntrustedCache, match="not private to you"):
        package_cache.private_folder()
    shared.chmod(0o1777)                                                      # as /tmp: sticky
    assert package_cache.private_folder() == (shared / "mine").absolute()
    assert never_loaded == []


def test_the_folders_it_makes_above_the_cache_are_private_at_umask_0(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With umask 000, the folders made above the cache (~/.cache/napari-daeformer) were 0777, and the cache then
    refused the folders it had made itself."""
    folder = tmp_path / "home" / ".cache" / "napari-daeformer" / "int8"
    monkeypatch.setenv(package_cache.CACHE_ENV, str(folder))
    old = os.umask(0)
    try:
        assert package_cache.private_folder() == folder
    finally:
        os.umask(old)
    for made in (folder, folder.parent, folder.parent.parent, tmp_path / "home"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made


def test_a_rejection_reason_is_never_a_terminal_escape(tiny_model: DAEFormer, cache: Path) -> None:
    package_cache.reject(key_of(tiny_model), "\x1b[2J\x1b[31mcleared your screen\nsecond line")
    reason = package_cache.rejection(key_of(tiny_model))
    assert reason is not None and "\x1b" not in reason and "\n" not in reason and reason.isprintable()
    assert "cleared your screen" in reason


def test_a_planted_rejection_that_others_could_write_is_refused(tiny_model: DAEFormer, cache: Path,
                                                                never_loaded: list[str]) -> None:
    rejected = package_cache.private_folder() / f"{key_of(tiny_model)}.rejected.json"
    rejected.write_text(json.dumps({"reason": "<b>planted</b>"}))
    rejected.chmod(0o666)
    with pytest.raises(static_int8.Unavailable, match="not a plain file of yours"):
        static_int8.load(tiny_model, 2, SIZE)


def test_int8_on_a_shared_cache_runs_int8_dynamic_and_says_why(tiny_ckpt: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               never_loaded: list[str]) -> None:
    """`int8` with a shared cache folder: a note and int8 dynamic, never a load (nor a compile into it)."""
    if not probes.cpu_has_int8_kernels():
        pytest.skip("no x86 int8 kernels in this torch build: int8 is refused outright (tests/test_devices.py)")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(package_cache.CACHE_ENV, str(shared))
    notes: list[str] = []
    image = np.random.default_rng(0).normal(0, 300, (2, 64, 64)).astype(np.float32)
    result = drain(SliceInferer(load_checkpoint(tiny_ckpt), device="cpu", precision="int8").run(image),
                   lambda p: notes.append(p.note) if p.note else None)
    assert result.numeric_path == "int8 dynamic" and never_loaded == []
    assert len(notes) == 1 and "not private to you" in notes[0] and notes[0].endswith("running int8 dynamic")
