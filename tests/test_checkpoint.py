"""Checkpoints: bit-exact round trip; pickles, truncated, foreign and inconsistent files refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_daeformer.base.errors import CheckpointError
from napari_daeformer.model import DAEFormer, named_config
from napari_daeformer.model.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing, rgb_preprocessing

from .conftest import TINY


def test_round_trip_is_bit_exact(tiny_ckpt: Path, tiny_model: DAEFormer) -> None:
    ckpt = load_checkpoint(tiny_ckpt)
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), ckpt.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert ckpt.card.config == TINY
    assert ckpt.card.class_names == ("background", "a", "b")
    assert ckpt.card.preprocessing == ct_preprocessing()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(tiny_model(x), ckpt.model(x))


def test_metadata_is_plain_json(tiny_ckpt: Path) -> None:
    raw = tiny_ckpt.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["napari_daeformer"])
    assert meta["format_version"] == 1 and meta["in_channels"] == 1
    assert meta["preprocessing"]["window"] == [-125.0, 275.0]
    assert len(meta["class_colors"]) == 3
    assert read_card(tiny_ckpt).input_size == (64, 64)


def test_half_precision_storage(tmp_path: Path, tiny_model: DAEFormer) -> None:
    card = ModelCard(TINY, ("bg", "a", "b"))
    full = save_checkpoint(tmp_path / "f.safetensors", tiny_model, card)
    half = save_checkpoint(tmp_path / "h.safetensors", tiny_model, card, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    restored = load_checkpoint(half).model
    assert all(p.dtype == torch.float32 for p in restored.parameters())


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.target),))


def test_pickle_refused_and_not_executed(tmp_path: Path) -> None:
    evil = _Evil()
    evil.target = str(tmp_path / "pwned")  # type: ignore[attr-defined]
    for name, dump in (("a.safetensors", lambda f: pickle.dump(evil, f)),
                       ("b.safetensors", lambda f: torch.save({"w": evil}, f))):
        with open(tmp_path / name, "wb") as f:
            dump(f)
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_truncated_empty_missing_and_foreign(tmp_path: Path, tiny_ckpt: Path) -> None:
    raw = tiny_ckpt.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a checkpoint at all, just words " * 10)
    cases = {"cut": "truncated", "empty": "empty", "foreign": "without napari-daeformer metadata",
             "text": "not a readable safetensors", "nothere": "no such"}
    for stem, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / f"{stem}.safetensors")
        assert f"{stem}.safetensors" in str(info.value)


def test_other_configuration_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Metadata of one configuration with the weights of another."""
    other = DAEFormer(named_config("small", num_classes=3, in_channels=1))
    card = ModelCard(TINY, ("bg", "a", "b"))
    tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
    meta = {"format": "napari-daeformer", "napari_daeformer": json.dumps(card.to_dict())}
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the configuration"):
        load_checkpoint(tmp_path / "mixed.safetensors")


def test_newer_format_refused(tmp_path: Path, tiny_model: DAEFormer) -> None:
    meta = ModelCard(TINY, ("bg", "a", "b")).to_dict() | {"format_version": 99}
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "new.safetensors"),
              metadata={"napari_daeformer": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "new.safetensors")


def test_card_validation() -> None:
    with pytest.raises(ValueError, match="class names"):
        ModelCard(TINY, ("bg", "a"))
    with pytest.raises(ValueError, match="channel"):
        ModelCard(TINY, ("bg", "a", "b"), preprocessing=rgb_preprocessing())


def test_save_is_atomic_and_refuses_overwrite(tmp_path: Path, tiny_ckpt: Path, tiny_model: DAEFormer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = tiny_ckpt.read_bytes()
    card = ModelCard(TINY, ("bg", "a", "b"))
    with pytest.raises(Exception, match="already exists"):
        save_checkpoint(tiny_ckpt, tiny_model, card, overwrite=False)

    def crash(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("napari_daeformer.model.checkpoint.save_file", crash)
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: not written \(disk full\); an earlier file"):
        save_checkpoint(tiny_ckpt, tiny_model, card)
    assert tiny_ckpt.read_bytes() == before                           # the old checkpoint is intact
    assert sorted(p.name for p in tiny_ckpt.parent.iterdir()) == [tiny_ckpt.name]  # no temp file left
