"""Hostile checkpoints: every file `save_checkpoint` writes loads; any other bytes or metadata end in one
CheckpointError line, quickly and within a bounded amount of memory, through the library and the CLI."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import CheckpointError
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint

from .conftest import TINY

META_KEY = "napari_daeformer"
SECONDS_PER_FILE = 5.0            # a refused file is refused in well under this on 2 CPU cores
EXTRA_PEAK_MB = 600               # the whole fuzz run raises the process's peak memory by less than this


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in DAEFormer(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def card_dict() -> dict[str, Any]:
    return ModelCard(TINY, ("background", "a", "b"), input_size=(64, 64)).to_dict()


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: str) -> Path:
    save_file(tensors, str(path), metadata={"format": "napari-daeformer", META_KEY: metadata})
    return path


def _refused_in_one_line(path: Path) -> str:
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert time.perf_counter() - start < SECONDS_PER_FILE
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 400
    return message


def test_every_header_length_residue_loads(tmp_path: Path) -> None:
    """The low byte of the safetensors header length takes every value a saved file can have (0x80 included, which
    was once taken for a pickle): each file reads, and those starting with 0x80 load with their weights."""
    model = DAEFormer(TINY)
    first_bytes = set()
    for k in range(256):
        card = ModelCard(TINY, ("background", "a", "b"), input_size=(64, 64), provenance={"note": "x" * k})
        path = save_checkpoint(tmp_path / "c.safetensors", model, card)
        first = path.read_bytes()[0]
        assert read_card(path).provenance["note"] == "x" * k
        if first == 0x80 or first not in first_bytes:
            load_checkpoint(path)
        first_bytes.add(first)
    assert 0x80 in first_bytes and len(first_bytes) == 32        # headers are padded to 8 bytes: 32 residues


@pytest.mark.parametrize("change, message", [
    ({"config": {**TINY.to_dict(), "depths": [100000, 2, 2]}}, "depths=100000 is outside"),
    ({"config": {**TINY.to_dict(), "embed_dims": [65536, 64, 64]}}, "embed_dims=65536 is outside"),
    ({"config": {**TINY.to_dict(), "channel_heads": 0}}, "channel_heads=0 is outside"),
    ({"config": {**TINY.to_dict(), "num_classes": True}}, "num_classes must be an integer"),
    ({"format_version": math.inf}, "format_version inf is not a positive integer"),
    ({"format_version": 2}, "newer than this napari-daeformer understands"),
    ({"preprocessing": {"kind": "ct", "window": [-125, 275], "mean": [0.5], "std": [math.nan]}}, "std > 0"),
    ({"preprocessing": {"kind": "ct", "window": [-125, math.inf], "mean": [0.5], "std": [0.5]}}, "finite"),
    ({"input_size": [64, 100]}, "multiples of 16"),
    ({"class_names": ["background", "a", "\x1b[31mred"]}, "printable names"),
    ({"class_colors": ["red", "#00ff00", "#0000ff"]}, "#rrggbb"),
    ({"provenance": [1, 2]}, "provenance must be a mapping"),
    ({"neighbour_weight": 0.9}, "neighbour weight must be a number from 0 to 0.45"),
])
def test_invalid_card_refused(tmp_path: Path, tensors: dict[str, torch.Tensor], card_dict: dict[str, Any],
                              change: dict[str, Any], message: str) -> None:
    path = _write(tmp_path / "bad.safetensors", tensors, json.dumps({**card_dict, **change}))
    assert message in _refused_in_one_line(path)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_card(path)


def test_hostile_metadata_text(tmp_path: Path, tensors: dict[str, torch.Tensor], card_dict: dict[str, Any]) -> None:
    cases = {
        "deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        "list": ("[1, 2, 3]", "must be a JSON object"),
        "huge": (json.dumps({**card_dict, "provenance": {"x": "y" * 5_000_000}}), "more than a checkpoint ever needs"),
        "bigint": (json.dumps(card_dict).replace('"format_version": 1', '"format_version": ' + "9" * 5000), "metadata"),
    }
    for name, (text, message) in cases.items():
        assert message in _refused_in_one_line(_write(tmp_path / f"{name}.safetensors", tensors, text)), name


def test_weights_must_be_finite_floats_of_the_right_shapes(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                                           card_dict: dict[str, Any]) -> None:
    meta = json.dumps(card_dict)
    key = next(iter(tensors))
    nan = {**tensors, key: torch.full_like(tensors[key], math.nan)}
    ints = {**tensors, key: tensors[key].to(torch.int32)}
    wrong = {**tensors, key: torch.zeros(3, 3)}
    assert "NaN or infinite" in _refused_in_one_line(_write(tmp_path / "nan.safetensors", nan, meta))
    assert "floating point" in _refused_in_one_line(_write(tmp_path / "int.safetensors", ints, meta))
    assert "wrong shape" in _refused_in_one_line(_write(tmp_path / "shape.safetensors", wrong, meta))


def test_devices_pipes_and_folders_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):                           # never opened: a FIFO would block forever
        assert "not a regular file" in _refused_in_one_line(path)
    assert "a folder" in _refused_in_one_line(tmp_path)


# Random JSON values to put where a card field should be.
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
_fields = st.sampled_from(["format_version", "config", "class_names", "class_colors", "input_size", "preprocessing",
                           "provenance", "in_channels", "neighbour_weight"])
_config_fields = st.sampled_from(["num_classes", "in_channels", "embed_dims", "depths", "decoder_depths",
                                  "mlp_ratio", "channel_heads", "unknown"])
_sizes = st.integers(-3, 10**9) | st.sampled_from([0, 1, 2, 16, 64, 2048, 2049, 65536, 10**6])


@pytest.fixture(scope="module")
def peak_memory_guard():  # type: ignore[no-untyped-def]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert grown < EXTRA_PEAK_MB, f"fuzzing raised the peak memory by {grown:.0f} MB"


@settings(max_examples=120, deadline=int(SECONDS_PER_FILE * 1000), suppress_health_check=list(HealthCheck))
@given(field=_fields, value=_json, config_field=_config_fields, config_value=_json | _sizes,
       dims=st.lists(_sizes, min_size=0, max_size=4), which=st.integers(0, 2))
def test_fuzzed_cards_fail_only_with_checkpoint_error(tmp_path_factory: pytest.TempPathFactory,
                                                      tensors: dict[str, torch.Tensor], card_dict: dict[str, Any],
                                                      peak_memory_guard: None, field: str, value: Any,
                                                      config_field: str, config_value: Any, dims: list[int],
                                                      which: int) -> None:
    data = json.loads(json.dumps(card_dict))
    if which == 0:
        data[field] = value
    elif which == 1:
        data["config"][config_field] = config_value
    else:                                                            # sizes that would cost gigabytes if built
        data["config"][config_field] = dims
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    _write(path, tensors, json.dumps(data))
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)
    else:                                                            # only an unchanged architecture can load
        assert ckpt.card.config == TINY


def test_cli_info_one_line_and_no_escape_codes(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                               card_dict: dict[str, Any], capsys) -> None:  # type: ignore[no-untyped-def]
    bad = _write(tmp_path / "bad.safetensors", tensors,
                 json.dumps({**card_dict, "config": {**TINY.to_dict(), "depths": [100000, 2, 2]}}))
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "depths=100000" in err
    assert main(["info", "/dev/zero"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    shouty = _write(tmp_path / "esc.safetensors", tensors,
                    json.dumps({**card_dict, "provenance": {"note": "\x1b[2J\x1b[31mgotcha\x07"}}))
    assert main(["info", str(shouty)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mgotcha" in out


@settings(max_examples=80, deadline=int(SECONDS_PER_FILE * 1000), suppress_health_check=list(HealthCheck))
@given(header_len=st.integers(0, 2**64 - 1) | st.integers(0, 4096), cut=st.integers(0, 10_000),
       flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=8), which=st.integers(0, 2))
def test_fuzzed_headers_fail_only_with_checkpoint_error(tmp_path_factory: pytest.TempPathFactory,
                                                        tensors: dict[str, torch.Tensor], card_dict: dict[str, Any],
                                                        peak_memory_guard: None, header_len: int, cut: int,
                                                        flips: list[tuple[int, int]], which: int) -> None:
    """A valid file with its header length replaced, bytes of its header changed, or cut short."""
    path = tmp_path_factory.mktemp("hdr") / "h.safetensors"
    raw = bytearray(_write(path, tensors, json.dumps(card_dict)).read_bytes())
    if which == 0:
        raw[:8] = header_len.to_bytes(8, "little")
    elif which == 1:
        for at, byte in flips:
            raw[8 + at % (len(raw) - 8)] = byte
    else:
        raw = raw[: cut % len(raw)]
    path.write_bytes(bytes(raw))
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)


def test_cli_segment_with_a_damaged_checkpoint_writes_nothing(  # type: ignore[no-untyped-def]
        tmp_path: Path, tensors: dict[str, torch.Tensor], card_dict: dict[str, Any], capsys) -> None:
    """NaN weights or a NaN std once gave an all-background map and exit 0."""
    import numpy as np

    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine

    pixels = np.random.default_rng(0).integers(-200, 200, (2, 32, 32)).astype(np.int16)
    scan = write_nifti(tmp_path / "scan.nii.gz", pixels, default_affine((1.0, 1.0, 1.0)))
    key = next(iter(tensors))
    damaged = {
        "nan_weights": _write(tmp_path / "w.safetensors", {**tensors, key: torch.full_like(tensors[key], math.nan)},
                              json.dumps(card_dict)),
        "nan_std": _write(tmp_path / "s.safetensors", tensors, json.dumps(
            {**card_dict, "preprocessing": {**card_dict["preprocessing"], "std": [math.nan]}})),
    }
    for name, model in damaged.items():
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(scan), str(out), "--model", str(model), "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and model.name in err, err
        assert not out.exists()
