"""The engine on synthetic pairs: a known affine, a known smooth deformation, inverse consistency."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dynomp import native
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
    pair = {"fixed": volume(image), "moving": volume(np.roll(image, 1, axis=0)),
            "config": dataclasses.replace(config, stages=(short,))}
    result = register_pair(**pair, precision="bf16")
    reference = register_pair(**pair, precision="fp32")
    assert [row["format"] for row in result.trace] == ["bf16"] * 3
    losses = [row["loss"] for row in result.trace]
    expected = [row["loss"] for row in reference.trace]
    # the per-voxel work ran in bf16 (other losses than fp32's, within a few per cent) ...
    assert all(loss != value and abs(loss - value) < 0.05 * abs(value) for loss, value in zip(losses, expected))
    # ... and the mean over voxels in fp32: the losses carry more than bf16's 8 significant bits
    assert any(float(torch.tensor(loss).to(torch.bfloat16).double()) != loss for loss in losses)


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


def test_syn_loss_scale_leaves_an_fp64_step_unchanged_bit_for_bit(fixed_pair):
    from dynomp.registration.config import PrecisionConfig
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.pipeline import SymmetricProblem
    from dynomp.registration.precision import PrecisionSetting
    from dynomp.registration.transforms import warp

    image, _ = fixed_pair
    fixed = torch.from_numpy(image).double()
    moving = torch.from_numpy(np.roll(image, 1, axis=0)).double()
    stage = quick_config().stages[2]
    field_ = 0.3 * smooth(torch.randn(3, *fixed.shape, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(0)), 2.0, dimensions=3)
    loss = build_loss("cc", fixed=fixed, moving=moving, radius=stage.cc_radius)
    setting = PrecisionSetting("fp64", device="cpu", config=PrecisionConfig())
    problem = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field_, moving_field=-field_,
                               loss=loss, stage=stage, setting=setting)
    assert problem.loss_scale == 2.0 ** round(np.log2(fixed.numel()))
    _, gradients = problem.evaluate()
    ours = [field_.clone().requires_grad_(True), (-field_).clone().requires_grad_(True)]
    unscaled = torch.autograd.grad(loss(warp(fixed, ours[0]), warp(moving, ours[1])), ours)
    # a power of two scales every value exactly
    assert all(torch.equal(g, problem.loss_scale * u) for g, u in zip(gradients, unscaled, strict=True))
    problem.step(gradients)
    scaled_step = [t.clone() for t in problem.state()]
    problem.fixed_field, problem.moving_field = field_, -field_
    problem.step(list(unscaled))
    assert all(torch.equal(a, b) for a, b in zip(scaled_step, problem.state(), strict=True))


@pytest.mark.skipif(native.compiler() is None or not native.enabled(),
                    reason="no C compiler on this machine, or DYNOMP_NATIVE=0")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_syn_compiled_evaluation_equals_autograd_bit_for_bit(fixed_pair, dtype):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.registration.config import PrecisionConfig
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.pipeline import SymmetricProblem
    from dynomp.registration.precision import PrecisionSetting

    image, _ = fixed_pair
    # column-major views, as the finest level's images are (NIfTI data)
    fixed = torch.from_numpy(np.asfortranarray(image)).double()
    moving = torch.from_numpy(np.asfortranarray(np.roll(image, 1, axis=0))).double()
    assert not fixed.is_contiguous()
    stage = quick_config().stages[2]
    field_ = 0.3 * smooth(torch.randn(3, *fixed.shape, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(1)), 2.0, dimensions=3)
    loss = build_loss("cc", fixed=fixed, moving=moving, radius=stage.cc_radius)
    arm = "fp32" if dtype == torch.float32 else "fp64"
    setting = PrecisionSetting(arm, device="cpu", config=PrecisionConfig())

    def problem(loss):
        return SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field_, moving_field=-0.5 * field_,
                                loss=loss, stage=stage, setting=setting)

    compiled = problem(loss)
    found = compiled._compiled_evaluate()
    assert found is not None
    value, gradients = found
    # the same loss as a plain callable: no compiled path, autograd takes the gradient
    through_autograd = problem(lambda f, m: loss(f, m))
    assert through_autograd._compiled_evaluate() is None
    expected_value, expected = through_autograd.evaluate()
    assert value.dtype == dtype and float(value) == float(expected_value) < -0.1
    assert all(g.dtype == dtype and g.shape == field_.shape for g in gradients)
    assert all(torch.equal(g, e) for g, e in zip(gradients, expected, strict=True))
    assert float(gradients[0].abs().max()) > 0 and float(gradients[1].abs().max()) > 0
    # an emulated format rounds every torch op: the compiled passes step aside there
    with VirtualPrecision("bf16"):
        assert compiled._compiled_evaluate() is None


def test_reference_losses_evaluate_a_16_bit_state_in_float64(fixed_pair):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.registration.config import PrecisionConfig
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.pipeline import LinearProblem, SymmetricProblem, _Pyramid
    from dynomp.registration.precision import PrecisionSetting

    image, _ = fixed_pair
    fixed = torch.from_numpy(image).double()
    moving = torch.from_numpy(np.roll(image, 2, axis=0)).double()
    affine = torch.diag(torch.tensor([SPACING, SPACING, SPACING, 1.0], dtype=torch.float64))
    bf16 = PrecisionSetting("bf16", device="cpu", config=PrecisionConfig(execution="virtual"))
    fp64 = PrecisionSetting("fp64", device="cpu", config=PrecisionConfig())
    # rigid: the bf16 problem's parameters, evaluated by an fp64 problem on the fp64 level
    stage = quick_config().stages[0]
    images = _Pyramid(fixed, affine, moving, affine).level(stage, 1)
    loss = build_loss("mi", fixed=images.fixed.data, moving=images.moving.data, sampling_fraction=0.5)

    def linear(setting, parameters):
        return LinearProblem(kind="rigid", images=images, parameters=parameters,
                             center=torch.zeros(3, dtype=torch.float64), loss=loss, learning_rate=0.25,
                             setting=setting, relaxation=0.5)

    problem = linear(bf16, torch.tensor([0.01, -0.02, 0.03, 1.1, -0.7, 0.4], dtype=torch.float64))
    for _ in range(3):
        with bf16.context():
            seen, gradients = problem.evaluate()
            problem.step(gradients)
    reference = problem.reference_loss(images)
    expected, _ = linear(fp64, problem.parameters.to(torch.float64)).evaluate()
    assert reference == pytest.approx(float(expected), rel=1e-9) and reference < -0.1
    # SyN: the bf16 problem's fields on the float64 images, against an fp64 problem's evaluation
    stage = quick_config().stages[2]
    field_ = 0.5 * smooth(torch.randn(3, *fixed.shape, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(2)), 2.0, dimensions=3)
    cc = build_loss("cc", fixed=fixed, moving=moving, radius=stage.cc_radius)
    rounded = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=field_, moving_field=-field_,
                               loss=cc, stage=stage, setting=bf16)
    with bf16.context(), VirtualPrecision("bf16"):
        seen = float(rounded.evaluate()[0])
    reference = rounded.reference_loss(fixed, moving)
    exact = SymmetricProblem(fixed=fixed, moving=moving, fixed_field=rounded.fixed_field.double(),
                             moving_field=rounded.moving_field.double(), loss=cc, stage=stage, setting=fp64)
    assert reference == pytest.approx(float(exact.evaluate()[0]), rel=1e-12)
    # the bf16 images and warps shift the loss the level saw; the reference reads past that
    assert abs(seen - reference) > 1e-5 * abs(reference)


def test_reference_losses_come_with_the_config_key(affine_pair, affine_result):
    image, _, moving, _ = affine_pair
    config = dataclasses.replace(linear_config(), reference_losses=True)
    result = register_pair(fixed=volume(image), moving=volume(moving), config=config, precision="fp32")
    assert affine_result.reference_losses == {}
    assert set(result.reference_losses) == set(result.final_losses) == set(affine_result.final_losses)
    for key, reference in result.reference_losses.items():
        # float64 MI of the fp32 arm's final state: near the loss fp64 ended with, one step apart
        assert math.isfinite(reference) and reference < 0
        assert reference == pytest.approx(affine_result.final_losses[key], rel=5e-3)


@pytest.mark.parametrize("arm", ["dynomp", "bf16"])
def test_only_dynomp_keeps_master_parameters(fixed_pair, arm):
    from dynomp.registration.config import PrecisionConfig
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.pipeline import LinearProblem, _Pyramid
    from dynomp.registration.precision import PrecisionSetting

    image, _ = fixed_pair
    fixed = torch.from_numpy(image).double()
    moving = torch.from_numpy(np.roll(image, 2, axis=0)).double()
    affine = torch.diag(torch.tensor([SPACING, SPACING, SPACING, 1.0], dtype=torch.float64))
    stage = quick_config().stages[0]
    images = _Pyramid(fixed, affine, moving, affine).level(stage, 0)
    setting = PrecisionSetting(arm, device="cpu", config=PrecisionConfig(
        formats=("bf16",), initial_format="bf16", execution="virtual"))
    assert setting.format == "bf16"
    loss = build_loss("mi", fixed=images.fixed.data, moving=images.moving.data, sampling_fraction=0.5)
    problem = LinearProblem(kind="rigid", images=images, parameters=torch.tensor([0.01, -0.02, 0.03, 1.1, -0.7, 0.4]),
                            center=torch.zeros(3, dtype=torch.float64), loss=loss, learning_rate=0.25,
                            setting=setting, relaxation=0.5)
    for _ in range(3):
        with setting.context():
            _, gradients = problem.evaluate()
            problem.step(gradients)
    problem.cast(setting)
    parameters = problem.parameters
    in_bf16 = torch.equal(parameters.to(torch.bfloat16).to(parameters.dtype), parameters)
    if arm == "dynomp":
        # unrounded fp32 masters: steps below a bf16 ulp of a parameter are kept
        assert parameters.dtype == torch.float32 and not in_bf16
    else:
        # the fixed arm holds its state in its own format
        assert parameters.dtype == torch.float32 and in_bf16


def test_a_registration_does_not_import_sympy(tmp_path):
    # autograd.grad given grad_outputs imports torch's symbolic shapes and sympy on its first call,
    # about 1 s added to every registration process; a fresh interpreter shows whether it happened
    script = tmp_path / "register.py"
    script.write_text(textwrap.dedent("""
        import sys
        import numpy as np
        from types import SimpleNamespace
        from dynomp.registration.config import quick_config
        from dynomp.registration.pipeline import register_pair
        grid = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij"))
        image = np.exp(-((grid - 5.5) ** 2).sum(0) / 12.0)
        pair = [SimpleNamespace(data=data, affine=np.eye(4)) for data in (image, np.roll(image, 1, 0))]
        for precision in ("fp64", "dynomp"):
            result = register_pair(fixed=pair[0], moving=pair[1], config=quick_config(),
                                   precision=precision)
            assert result.status == "completed", result.status
        print(sorted(name for name in sys.modules if name.split(".")[0] == "sympy"))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
