"""Dice and HD95 against hand-computed values, empty cases included (conventions in napari_daeformer.base.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_daeformer.base.metrics import dice_per_class, evaluate_case, hd95


def test_dice_hand_computed() -> None:
    truth = np.zeros((1, 4, 4), np.uint8)
    pred = np.zeros((1, 4, 4), np.uint8)
    truth[0, :2, :2] = 1          # 4 voxels
    pred[0, :2, :3] = 1           # 6 voxels, 4 shared -> 2*4/10
    truth[0, 3, 3] = 2            # class 2 missed entirely -> 0
    dice = dice_per_class(pred, truth, 4)
    assert dice[0] == pytest.approx(0.8) and dice[1] == 0.0 and np.isnan(dice[2])   # class 3 absent: NaN


def test_hd95_hand_computed_with_spacing() -> None:
    truth = np.zeros((1, 1, 12), bool)
    pred = np.zeros((1, 1, 12), bool)
    truth[0, 0, 2:5] = True        # surface voxels 2, 3, 4 (a 1-voxel-thick line is all surface)
    pred[0, 0, 5:8] = True         # 5, 6, 7
    # pred -> truth distances (voxels): 1, 2, 3; truth -> pred: 3, 2, 1; 95th percentile of each: 2.9
    assert hd95(pred, truth) == pytest.approx(2.9)
    assert hd95(pred, truth, spacing=(3.0, 0.8, 0.5)) == pytest.approx(2.9 * 0.5)   # x spacing 0.5 mm
    with pytest.raises(ValueError):
        hd95(np.zeros_like(pred), truth)


def test_empty_conventions_ours_and_paper() -> None:
    truth = np.zeros((2, 6, 6), np.uint8)
    pred = np.zeros((2, 6, 6), np.uint8)
    truth[0, 1:3, 1:3] = 1         # class 1: missed (empty prediction)
    pred[1, 2:4, 2:4] = 2          # class 2: predicted where the ground truth has none
    dice, dist = evaluate_case(pred, truth, 4, spacing=(2.0, 1.0, 1.0))
    assert dice.tolist()[:2] == [0.0, 0.0] and np.isnan(dice[2])
    assert np.isnan(dist).all()
    dice, dist = evaluate_case(pred, truth, 4, protocol="paper")
    assert dice.tolist() == [0.0, 1.0, 0.0] and dist.tolist() == [0.0, 0.0, 0.0]


def test_identical_masks() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((4, 16, 16)) > 0.7).astype(np.uint8)
    dice, dist = evaluate_case(labels, labels, 2, spacing=(3.0, 1.0, 1.0))
    assert dice[0] == 1.0 and dist[0] == 0.0


def _random_masks(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    a, b = (ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=2) for _ in range(2))
    return a, b


CASES = [(0, (20, 30, 25), (1.0, 1.0, 1.0)), (1, (12, 40, 40), (3.0, 0.8, 0.7)), (2, (50, 60), (1.5, 0.5)),
         (3, (8, 33, 17), (5.0, 0.6, 0.9)), (4, (64, 48), (1.0, 1.0))]


@pytest.mark.parametrize("seed, shape, spacing", CASES)
def test_paper_protocol_hd95_is_medpys(seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    from medpy.metric.binary import hd95 as medpy_hd95
    a, b = _random_masks(seed, shape)
    assert hd95(a, b, spacing, pooled=True) == pytest.approx(medpy_hd95(a, b, voxelspacing=spacing), abs=1e-6)
    assert hd95(a, b, None, pooled=True) == pytest.approx(medpy_hd95(a, b), abs=1e-6)
    _, dist = evaluate_case(a.astype(np.uint8), b.astype(np.uint8), 2, spacing, protocol="paper")   # in voxels
    assert dist[0] == pytest.approx(medpy_hd95(a, b), abs=1e-6)


@pytest.mark.parametrize("seed, shape, spacing", CASES)
def test_our_protocol_hd95_is_monais(seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance
    a, b = _random_masks(seed, shape)
    ref = compute_hausdorff_distance(torch.from_numpy(a[None, None]).float(), torch.from_numpy(b[None, None]).float(),
                                     percentile=95, spacing=list(spacing)).item()
    assert hd95(a, b, spacing) == pytest.approx(ref, rel=1e-6)
    _, dist = evaluate_case(a.astype(np.uint8), b.astype(np.uint8), 2, spacing)
    assert dist[0] == pytest.approx(ref, rel=1e-6)
