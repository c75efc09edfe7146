"""Jacobian statistics, similarity and meters on fields and images with known answers."""

import numpy as np
import pytest

from dynomp.evaluate.jacobian import folding_percent, jacobian_determinant, sd_log_jacobian
from dynomp.evaluate.meters import ResourceMeter
from dynomp.evaluate.similarity import normalized_cross_correlation, normalized_mutual_information


def grid(shape, spacing):
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def test_jacobian_of_a_uniform_scaling_is_its_determinant():
    points = grid((8, 9, 10), (2.0, 1.0, 1.5))
    displacement = points * np.array([0.1, -0.2, 0.3])
    determinant = jacobian_determinant(displacement, spacing=(2.0, 1.0, 1.5))
    assert np.allclose(determinant, 1.1 * 0.8 * 1.3)
    assert folding_percent(determinant) == 0.0
    assert sd_log_jacobian(determinant) == pytest.approx(0.0, abs=1e-12)


def test_folding_is_counted_where_the_map_reverses():
    points = grid((10, 10), (1.0, 1.0))
    displacement = np.zeros_like(points)
    displacement[:5, :, 0] = -2.0 * points[:5, :, 0]  # x -> -x on the first half: det = -1 there
    determinant = jacobian_determinant(displacement, spacing=(1.0, 1.0))
    assert folding_percent(determinant) == pytest.approx(40.0)  # rows 0-3; row 4's gradient mixes
    assert sd_log_jacobian(determinant) > 0
    with pytest.raises(ValueError, match="spacing: expected 2 values"):
        jacobian_determinant(displacement, spacing=(1.0,))


def test_similarity_of_known_pairs():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 12, 12))
    assert normalized_cross_correlation(image, 3 * image + 2) == pytest.approx(1.0)
    assert normalized_cross_correlation(image, -image) == pytest.approx(-1.0)
    assert normalized_mutual_information(image, image) == pytest.approx(2.0)
    independent = normalized_mutual_information(image, rng.normal(size=image.shape))
    assert 1.0 <= independent < 1.2
    with pytest.raises(ValueError, match="differ in shape"):
        normalized_cross_correlation(image, image[0])


def test_meter_sees_an_allocation():
    with ResourceMeter() as meter:
        block = np.ones(40_000_000)  # 320 MB
        block.sum()
    assert meter.wall_seconds > 0
    assert meter.peak_rss_bytes - meter.baseline_rss_bytes > 200e6 or meter.peak_rss_bytes > 320e6
    assert meter.peak_gpu_bytes is None
