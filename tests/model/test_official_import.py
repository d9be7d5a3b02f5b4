"""`import-official`: every used official tensor lands in exactly one of our parameters."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import CheckpointError
from napari_daeformer.model.checkpoint import load_checkpoint
from napari_daeformer.model.official import convert_official_state_dict, load_official_state_dict

from ..conftest import official_rows


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=gen) for key, shape, _ in official_rows()}


def test_every_parameter_comes_from_the_file(official_state: dict[str, torch.Tensor]) -> None:
    model, report = convert_official_state_dict(official_state, in_channels=3)
    used = [k for k, _, u in official_rows() if u]
    assert report.mapped == len(used) == len(model.state_dict())
    assert report.dropped_unused == len(official_rows()) - len(used)
    ours = sorted(t.flatten()[:8].tolist() for t in model.state_dict().values())
    theirs = sorted(official_state[k].flatten()[:8].tolist() for k in used)
    assert ours == theirs                                  # a bijection of values: nothing left at init


def test_gray_input_folds_the_channel_repeat(official_state: dict[str, torch.Tensor]) -> None:
    rgb, _ = convert_official_state_dict(official_state, in_channels=3)
    gray, report = convert_official_state_dict(official_state, in_channels=1)
    assert report.folded_rgb_to_gray
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray.eval()(x), rgb.eval()(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_shape_mismatch_and_missing_key_refused(official_state: dict[str, torch.Tensor]) -> None:
    bad = dict(official_state)
    bad["backbone.block1.0.attn.keys.weight"] = torch.randn(64, 128, 1, 1)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        convert_official_state_dict(bad)
    missing = {k: v for k, v in official_state.items() if k != "decoder_0.concat_linear.bias"}
    with pytest.raises(CheckpointError, match="missing"):
        convert_official_state_dict(missing)
    with pytest.raises(CheckpointError, match="architecture"):
        convert_official_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_cli_round_trip(tmp_path: Path, official_state: dict[str, torch.Tensor], capsys) -> None:  # type: ignore[no-untyped-def]
    pth = tmp_path / "synapse.pth"
    torch.save({"module." + k: v for k, v in official_state.items()}, pth)
    assert main(["import-official", str(pth), str(tmp_path / "out.safetensors")]) == 0
    assert "dropped 200" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "out.safetensors")
    assert ckpt.card.class_names[5] == "liver" and ckpt.card.config.in_channels == 1
    assert main(["import-official", str(pth), str(tmp_path / "out.safetensors")]) == 2   # exists: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_not_executed(tmp_path: Path) -> None:
    evil = _Evil()
    evil.target = str(tmp_path / "pwned")  # type: ignore[attr-defined]
    torch.save({"x": evil}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_official_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(evil, f)
    with pytest.raises(CheckpointError):
        load_official_state_dict(tmp_path / "raw.pkl")
    assert not (tmp_path / "pwned").exists()
