"""The engine on synthetic pairs: a known affine, a known smooth deformation, inverse consistency."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dynomp.evaluate.overlap import dice, mean_over_labels
from dynomp.registration.config import quick_config
from dynomp.registration.pipeline import _assemble_fields, register_pair
from dynomp.registration.pyramid import smooth
from dynomp.registration.transforms import sample

from .conftest import KNOWN_MATRIX, KNOWN_SHIFT, SIZE, SPACING, volume


def linear_config():
    """The quick pipeline without SyN."""
    config = quick_config()
    return dataclasses.replace(config, stages=config.stages[:2])


@pytest.fixture(scope="module")
def affine_result(affine_pair):
    image, _, moving, _ = affine_pair
    return register_pair(fixed=volume(image), moving=volume(moving), config=linear_config(),
                         precision="fp64")


@pytest.fixture(scope="module")
def deformable_result(deformed_pair):
    image, _, moving, _ = deformed_pair
    return register_pair(fixed=volume(image), moving=volume(moving), config=quick_config(),
                         precision="fp64")


def test_recovers_a_known_affine(affine_pair, affine_result):
    _, labels, _, moving_labels = affine_pair
    assert affine_result.status == "completed"
    assert np.abs(affine_result.transform[:3, :3] - KNOWN_MATRIX).max() < 0.06
    # where the known map sends the labelled voxels, in mm, against where the result sends them
    center = np.full(3, (SIZE - 1) / 2)
    voxels = np.argwhere(labels > 0).T.astype(float)
    expected = SPACING * (KNOWN_MATRIX @ (voxels - center[:, None]) + center[:, None] + KNOWN_SHIFT[:, None])
    points = SPACING * voxels
    found = affine_result.transform[:3, :3] @ points + affine_result.transform[:3, 3:]
    assert np.linalg.norm(found - expected, axis=0).mean() < SPACING * 0.75
    before = mean_over_labels(dice(labels, moving_labels))
    after = mean_over_labels(dice(labels, affine_result.warp_moving(moving_labels, labels=True)))
    assert before < 0.5 and after > 0.93


@pytest.mark.slow
def test_recovers_a_known_smooth_deformation(deformed_pair, deformable_result):
    _, labels, _, moving_labels = deformed_pair
    before = mean_over_labels(dice(labels, moving_labels))
    after = mean_over_labels(dice(labels, deformable_result.warp_moving(moving_labels, labels=True)))
    assert deformable_result.status == "completed"
    assert after > before + 0.15 and after > 0.85, (before, after)
    finest = [row["loss"] for row in deformable_result.trace
              if row["stage"] == "syn" and row["level"] == 0]
    assert finest[-1] < finest[0]


@pytest.mark.slow
def test_forward_after_inverse_is_near_identity(deformable_result):
    forward = deformable_result.forward_displacement  # fixed grid, mm
    inverse = deformable_result.inverse_displacement  # moving grid, mm
    grid = np.stack(np.meshgrid(*[np.arange(SIZE, dtype=float)] * 3, indexing="ij"))
    moving_points = grid * SPACING + np.moveaxis(forward, -1, 0)
    back = sample(torch.as_tensor(np.moveaxis(inverse, -1, 0)), torch.as_tensor(moving_points / SPACING))
    residual = np.linalg.norm(moving_points + back.numpy() - grid * SPACING, axis=0)
    interior = (slice(4, -4),) * 3
    assert np.abs(forward).max() > SPACING  # a real deformation, not the identity
    assert residual[interior].mean() < 0.1 * SPACING
    assert np.percentile(residual[interior], 99) < 0.5 * SPACING


@pytest.mark.slow
def test_dynomp_changes_format_and_records_it(affine_pair):
    image, _, moving, _ = affine_pair
    result = register_pair(fixed=volume(image), moving=volume(moving), config=linear_config(),
                           precision="dynomp")
    formats = [row["format"] for row in result.trace]
    changes = sum(1 for a, b in zip(formats, formats[1:], strict=False) if a != b)
    assert formats[0] == "fp64" and changes >= 1
    assert set(result.seconds_by_format) == set(formats)
    assert any(np.isfinite(row["pmin_smoothed"]) for row in result.trace)


def test_fixed_fp32_arm_matches_fp64_closely(affine_pair, affine_result):
    image, _, moving, _ = affine_pair
    result = register_pair(fixed=volume(image), moving=volume(moving), config=linear_config(),
                           precision="fp32")
    assert {row["format"] for row in result.trace} == {"fp32"}
    assert np.abs(result.transform - affine_result.transform).max() < 0.05


def test_emulated_bf16_arm_runs_in_bf16_and_keeps_pmin(fixed_pair):
    image, _ = fixed_pair
    config = quick_config()
    short = dataclasses.replace(config.stages[0], iterations=(3, 0, 0))
    result = register_pair(fixed=volume(image), moving=volume(np.roll(image, 1, axis=0)),
                           config=dataclasses.replace(config, stages=(short,)), precision="bf16")
    assert [row["format"] for row in result.trace] == ["bf16"] * 3
    losses = [row["loss"] for row in result.trace]
    # every loss is a bf16 value: rounding it to 8 significant bits leaves it unchanged
    assert all(float(torch.tensor(loss).to(torch.bfloat16).double()) == loss for loss in losses)


def test_nan_loss_is_reported_as_diverged(fixed_pair):
    image, _ = fixed_pair
    config = quick_config()
    # fp16's largest value is 65504: intensities of 1e6 overflow it, and the loss turns NaN
    result = register_pair(fixed=volume(image * 1e6), moving=volume(np.roll(image, 1, 0) * 1e6),
                           config=dataclasses.replace(config, stages=(config.stages[2],)),
                           precision="fp16")
    assert result.status == "diverged"
    assert result.diverged_at == {"stage": "syn", "level": 0, "iteration": 0}
    assert np.isfinite(result.forward_displacement).all()


def test_different_dimensionality_is_refused(fixed_pair):
    image, _ = fixed_pair
    with pytest.raises(ValueError, match="moving: 2-D image where the fixed image is 3-D"):
        register_pair(fixed=volume(image), moving=volume(image[0]), config=quick_config(),
                      precision="fp64")


def test_nan_voxels_are_refused(fixed_pair):
    image, _ = fixed_pair
    broken = image.copy()
    broken[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="moving: the image has NaN"):
        register_pair(fixed=volume(image), moving=volume(broken), config=quick_config(),
                      precision="fp64")


def test_unknown_arm_is_refused(fixed_pair):
    image, _ = fixed_pair
    with pytest.raises(ValueError, match="'fp12' is not an engine arm"):
        register_pair(fixed=volume(image), moving=volume(image), config=quick_config(),
                      precision="fp12")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_syn_fields_are_assembled_in_their_own_format_and_returned_in_float64(dtype):
    generator = torch.Generator().manual_seed(3)
    shape = (14, 15, 13)
    fixed_field, moving_field = (
        smooth(torch.randn(3, *shape, dtype=torch.float64, generator=generator), 2.5, dimensions=3) * 2.0
        for _ in range(2)
    )
    expected = _assemble_fields([fixed_field, moving_field], shape)
    forward, backward = _assemble_fields([fixed_field.to(dtype), moving_field.to(dtype)], shape)
    assert forward.dtype == backward.dtype == torch.float64
    # u_m after u_f^-1 differs from u_m: the inversion ran
    assert float((forward - moving_field).abs().max()) > 0.05
    difference = max(float((forward - expected[0]).abs().max()), float((backward - expected[1]).abs().max()))
    if dtype == torch.float64:
        assert difference == 0.0
    else:  # computed in float32: its rounding, far below the inversion's 1e-4-voxel tolerance
        assert 0.0 < difference < 1e-4
