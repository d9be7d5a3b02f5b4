"""Each slice's softmax averaged with its neighbours': streamed in any order it equals the whole-volume average,
holds only a few slices, and reaches the labels through the engine and the model card."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import InferenceError
from napari_daeformer.base.jobs import drain
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.engine.neighbours import NeighbourMix, mixed
from napari_daeformer.io import read_image
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.orientation import radiological_affine
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard, load_checkpoint, save_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing

from .conftest import TINY


def whole_volume(p: np.ndarray, members: np.ndarray, w: float) -> np.ndarray:
    """(S, n, Y, X) the reference: each member slice averaged with its member neighbours, a missing one replaced by
    the slice itself."""
    out = np.zeros_like(p)
    for z in np.flatnonzero(members):
        near = [y for y in (z - 1, z + 1) if 0 <= y < len(p) and members[y]]
        out[z] = (1 - w * len(near)) * p[z] + w * sum(p[y] for y in near)
    return out


@pytest.mark.parametrize("order", ["ascending", "outwards", "shuffled"])
def test_streamed_average_equals_the_whole_volume_one_and_lets_slices_go(order: str) -> None:
    rng = np.random.default_rng(0)
    p = rng.random((11, 3, 4, 5)).astype(np.float32)
    members = np.ones(11, bool)
    members[[3, 4]] = False                                  # slices the run skips (the user's corrections)
    run = np.flatnonzero(members)
    if order == "outwards":
        run = run[np.argsort(np.abs(run - 6), kind="stable")]
    elif order == "shuffled":
        run = rng.permutation(run)
    mix, got, most_held = NeighbourMix(0.3, members), {}, 0
    for batch in np.array_split(run, 4):
        for z, q in mix.add(batch, torch.from_numpy(p[batch])):
            assert z not in got                             # each slice is final once
            got[z] = q
        most_held = max(most_held, len(mix.held))
    assert sorted(got) == sorted(run.tolist())
    ref = whole_volume(p, members, 0.3)
    for z, q in got.items():
        np.testing.assert_allclose(q.numpy(), ref[z], rtol=1e-6)
    assert not mix.held and most_held < len(run)           # everything let go; never the whole volume
    assert np.allclose(got[2].numpy(), p[2] * 0.7 + p[1] * 0.3)   # slice 3 not in the run: the slice itself instead


def _tiny(weight: float = 0.0) -> Checkpoint:
    torch.manual_seed(0)
    card = ModelCard(TINY, ("background", "a", "b"), input_size=(64, 64), preprocessing=ct_preprocessing(),
                     neighbour_weight=weight)
    return Checkpoint(DAEFormer(TINY).eval(), card)


def test_the_engine_averages_neighbours_as_the_card_says() -> None:
    image = np.random.default_rng(1).normal(40, 300, (7, 48, 40)).astype(np.int16)
    plain = _tiny()
    p = SliceInferer(plain, device="cpu", precision="fp32").segment(image, probabilities=True).probabilities
    ref = whole_volume(np.moveaxis(p.astype(np.float32), 0, 1), np.ones(7, bool), 0.3)     # (S, n, Y, X)
    averaged = replace(plain, card=replace(plain.card, neighbour_weight=0.3))
    inferer = SliceInferer(averaged, device="cpu", precision="fp32", batch_size=2)
    progress: list[np.ndarray] = []
    res = drain(inferer.run(image, probabilities=True, entropy=True, slice_uncertainty=True, first=3),
                lambda q: progress.append(q.slices))
    np.testing.assert_allclose(np.moveaxis(res.probabilities.astype(np.float32), 0, 1), ref, atol=2e-3)
    top = np.sort(ref, 1)
    sure = top[:, -1] - top[:, -2] > 1e-2                   # fp16 output rounding decides only near-ties
    assert np.array_equal(res.labels[sure], ref.argmax(1)[sure])
    assert (res.labels != p.argmax(0)).any()                 # the average changed some labels
    assert sorted(np.concatenate(progress).tolist()) == list(range(7))          # each slice shown once, when final
    assert res.entropy.shape == image.shape and res.slice_uncertainty.shape == (7,)
    off = SliceInferer(averaged, device="cpu", precision="fp32", neighbour_weight=0.0).segment(image).labels
    assert np.array_equal(off, SliceInferer(plain, device="cpu", precision="fp32").segment(image).labels)
    one = SliceInferer(averaged, device="cpu", precision="fp32").segment(image[2]).labels    # a 2D image: itself
    assert np.array_equal(one, off[2])
    with pytest.raises(InferenceError, match="neighbour weight"):
        SliceInferer(plain, neighbour_weight=0.7)


def test_the_card_carries_the_weight_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """(A bad weight in a file: `tests/test_checkpoint_hostile.py`.)"""
    ckpt = _tiny(0.25)
    path = save_checkpoint(tmp_path / "m.safetensors", ckpt.model, ckpt.card)
    assert load_checkpoint(path).card.neighbour_weight == 0.25
    data = ckpt.card.to_dict()
    for bad in (0.5, -0.1, "0.3", True):
        with pytest.raises(ValueError, match="neighbour weight"):
            ModelCard.from_dict({**data, "neighbour_weight": bad})
    older = {k: v for k, v in data.items() if k != "neighbour_weight"}           # a checkpoint from before
    assert ModelCard.from_dict(older).neighbour_weight == 0.0


def test_cli_segment_takes_a_neighbour_weight_and_refuses_a_bad_one(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = _tiny()
    model = save_checkpoint(tmp_path / "m.safetensors", ckpt.model, ckpt.card)
    image = np.random.default_rng(2).normal(40, 300, (5, 48, 40)).astype(np.int16)
    source = write_nifti(tmp_path / "ct.nii.gz", image, radiological_affine((6.0, 1.0, 1.0)))   # stored as shown
    argv = ["segment", str(source), str(tmp_path / "out.nii.gz"), "--model", str(model), "--device", "cpu",
            "--precision", "fp32"]
    assert main([*argv, "--neighbour-weight", "0.3"]) == 0
    expected = SliceInferer(ckpt, device="cpu", precision="fp32", neighbour_weight=0.3).segment(image).labels
    assert np.array_equal(read_image(tmp_path / "out.nii.gz").data, expected)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--overwrite", "--neighbour-weight", "0.6"])
    assert exit_.value.code == 2 and "at most 0.45" in capsys.readouterr().err


def test_a_structure_on_one_slice_only_is_kept_only_at_a_small_weight() -> None:
    """What the docs warn of: between slices sure of background, a structure the model finds on one slice alone at
    0.9 survives a weight of 0.1 but not 0.3 (its share there is 0.4 * 0.9 against 0.4 * 0.1 + 0.6)."""
    lesion = torch.tensor([0.1, 0.9])                                   # (n=2 classes): background, lesion
    background = torch.tensor([1.0, 0.0])
    assert mixed(lesion, [background, background], 0.1).argmax(0) == 1
    assert mixed(lesion, [background, background], 0.3).argmax(0) == 0
    assert mixed(lesion, [lesion, background], 0.3).argmax(0) == 1          # on two slices it stays
