"""Dice and Jaccard per label."""

import math

import numpy as np
import pytest

from dynomp.evaluate.overlap import dice, jaccard, mask_dice, mean_over_labels


def test_known_overlaps():
    fixed = np.zeros((10, 10, 10), dtype=np.int32)
    moving = np.zeros_like(fixed)
    fixed[:5] = 1  # 500 voxels
    moving[1:6] = 1  # 500 voxels, 400 shared
    fixed[8:, :, :] = 2
    moving[8:, :5, :] = 2  # 200 vs 100, 100 shared
    assert dice(fixed, moving) == pytest.approx({1: 0.8, 2: 2 * 100 / 300})
    assert jaccard(fixed, moving) == pytest.approx({1: 400 / 600, 2: 0.5})
    assert mean_over_labels(dice(fixed, moving)) == pytest.approx((0.8 + 2 / 3) / 2)


def test_requested_label_absent_from_both_is_nan_and_ignored_in_the_mean():
    a = np.ones((4, 4), dtype=np.int32)
    scores = dice(a, a, labels=[1, 7])
    assert scores[1] == 1.0 and math.isnan(scores[7])
    assert mean_over_labels(scores) == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="empty"):
        dice(np.zeros((3, 3)), np.zeros((3, 3)))


def test_mask_dice_treats_any_non_zero_value_as_inside():
    first = np.zeros((10, 10), dtype=np.float32)
    second = np.zeros((10, 10), dtype=np.uint8)
    first[:5] = 0.7  # 50 voxels
    second[2:7] = 3  # 50 voxels, 30 shared
    assert mask_dice(first, second) == pytest.approx(0.6)
