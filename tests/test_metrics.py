"""Dice and HD95 against hand-computed values, empty cases included (conventions in napari_daeformer.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_daeformer.metrics import dice_per_class, evaluate_case, hd95


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
