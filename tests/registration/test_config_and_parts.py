"""Config loading, the convergence test, the pyramid and the field algebra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynomp.registration.config import load_config, paper_config, quick_config
from dynomp.registration.metrics import local_cross_correlation, mutual_information
from dynomp.registration.optimizer import ConvergenceMonitor, ScaledGradientDescent, convergence_value
from dynomp.registration.precision import check_arm
from dynomp.registration.pyramid import build_level
from dynomp.registration.transforms import compose, invert, resize_field

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "registration"


def test_paper_yaml_is_the_paper_default_and_quick_yaml_is_quick():
    assert load_config(CONFIGS / "paper.yaml") == paper_config()
    assert load_config(CONFIGS / "quick.yaml") == quick_config()


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - name: rigid\n    learnign_rate: 0.2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: stages\[0\]: unknown key 'learnign_rate'"):
        load_config(path)
    path.write_text("precison: {}\n")
    with pytest.raises(ValueError, match="unknown key 'precison'"):
        load_config(path)
    path.write_text("precision: {execution: turbo}\n")
    with pytest.raises(ValueError, match="precision.execution: unknown mode 'turbo'"):
        load_config(path)


def test_reference_losses_is_a_boolean_key(tmp_path):
    path = tmp_path / "bad.yaml"
    assert load_config(None).reference_losses is False
    path.write_text("preset: quick\nreference_losses: true\n")
    assert load_config(path).reference_losses is True
    assert load_config(path).to_dict()["reference_losses"] is True
    path.write_text("reference_losses: yes please\n")
    with pytest.raises(ValueError, match=r"bad.yaml: reference_losses: expected true or false, got 'yes please'"):
        load_config(path)


def test_unknown_arm_is_named():
    with pytest.raises(ValueError, match="--arm: unknown arm 'fp12'"):
        check_arm("fp12")


def test_convergence_value_of_linear_and_flat_curves():
    assert convergence_value([1.0] * 10) == pytest.approx(0.0)
    # a loss falling linearly from 10 to 1, normalised by its sum 55: slope -9/55 per unit t
    assert convergence_value([float(v) for v in range(10, 0, -1)]) == pytest.approx(9 / 55)
    monitor = ConvergenceMonitor(window=10, threshold=1e-6)
    flags = [monitor.converged(-1.0) for _ in range(10)]
    assert flags == [False] * 9 + [True]


def step_to_minimum(relaxation: float, steps: int = 40) -> tuple[float, float]:
    """Regular steps on (p - 3.3)^2 from 0 with 1 mm steps; (final p, final step length)."""
    optimizer = ScaledGradientDescent(torch.ones(1, dtype=torch.float64), max_shift=1.0, relaxation=relaxation)
    parameter = torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        parameter = optimizer.step(parameter, 2.0 * (parameter - 3.3))
    return float(parameter), optimizer.step_length


def test_regular_steps_shrink_when_they_reverse_and_settle_on_the_minimum():
    # 0, 1, 2, 3, 4 in full steps; past the minimum the direction reverses and the step halves
    position, length = step_to_minimum(0.5)
    assert abs(position - 3.3) < 1e-3 and length < 1e-2
    # without relaxation the steps keep their length and the parameter keeps jumping over 3.3
    position, length = step_to_minimum(1.0)
    assert length == 1.0 and abs(position - 3.3) > 0.25
    with pytest.raises(ValueError, match="relaxation"):
        ScaledGradientDescent(torch.ones(1), max_shift=1.0, relaxation=0.0)


def test_pyramid_level_keeps_the_field_of_view():
    volume = torch.arange(16 * 12 * 8, dtype=torch.float64).reshape(16, 12, 8)
    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0], dtype=torch.float64))
    level = build_level(volume, affine, shrink_factor=4, sigma=0.0)
    assert tuple(level.data.shape) == (4, 3, 2)
    # the first and last coarse voxels sit on the first and last fine voxels
    assert float(level.data[0, 0, 0]) == 0.0 and float(level.data[-1, -1, -1]) == float(volume[-1, -1, -1])
    assert torch.allclose(level.affine @ torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64),
                          torch.tensor([30.0, 33.0, 7.0, 1.0], dtype=torch.float64))


def test_field_inverse_and_resize():
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 20, dtype=torch.float64)] * 3, indexing="ij"))
    field = 1.5 * torch.sin(torch.pi * grid[[1, 2, 0]])
    inverse = invert(field, iterations=30)
    residual = compose(field, inverse)[:, 3:-3, 3:-3, 3:-3]
    assert residual.abs().max() < 0.02
    bigger = resize_field(field, (39, 39, 39))
    assert torch.allclose(bigger[:, ::2, ::2, ::2], 2 * field)


def test_metrics_peak_at_alignment():
    image = torch.randn(24, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shifted = torch.roll(image, 2, 0)
    limits = (float(image.min()), float(image.max()))
    same = mutual_information(image, image, fixed_range=limits, moving_range=limits)
    other = mutual_information(image, shifted, fixed_range=limits, moving_range=limits)
    assert same > 1.0 > 0.1 > other
    assert local_cross_correlation(image, 2 * image + 1, radius=2) > 0.99
    assert local_cross_correlation(image, shifted, radius=2) < 0.1


def test_a_nan_intensity_makes_mutual_information_nan_not_an_index_error():
    fixed = torch.linspace(0.0, 1.0, 100, dtype=torch.float64)
    moving = fixed.flip(0).clone()
    moving[17] = float("nan")  # what a diverging fp16 run produces
    value = mutual_information(fixed, moving, bins=32, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0))
    assert torch.isnan(value)
    finite = mutual_information(fixed, fixed.flip(0), bins=32, fixed_range=(0.0, 1.0),
                                moving_range=(0.0, 1.0))
    assert torch.isfinite(finite) and finite > 0


def test_local_cc_stays_a_squared_correlation_when_sums_cancel_in_bf16():
    generator = torch.Generator().manual_seed(0)
    # intensities 30-40: sum of squares minus squared sum cancels in bf16's 8 significand bits,
    # and the variances that result (negative or tiny) once sent the mean to 1.3e8
    fixed = (30.0 + 10.0 * torch.rand(12, 12, 12, generator=generator)).to(torch.bfloat16)
    moving = (30.0 + 10.0 * torch.rand(12, 12, 12, generator=generator)).to(torch.bfloat16)
    value = float(local_cross_correlation(fixed, moving, radius=2))
    assert 0.0 <= value <= 1.0
    exact = float(local_cross_correlation(fixed.double(), moving.double(), radius=2))
    assert 0.0 <= exact < 0.05  # independent noise: little local correlation


def test_largest_intermediate_bounds_what_each_metric_computes():
    from dynomp.registration.metrics import largest_intermediate

    fixed = torch.full((4, 4, 4), 3.0)
    moving = torch.full((4, 4, 4), -5.0)
    assert largest_intermediate("cc", fixed=fixed, moving=moving, radius=4, samples=10) == 729 * 25
    assert largest_intermediate("mi", fixed=fixed, moving=moving, radius=4, samples=70000) == 70000
    assert largest_intermediate("mse", fixed=fixed, moving=moving, radius=4, samples=10) == 100
