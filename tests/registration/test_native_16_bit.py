"""16-bit formats held in their own dtypes (`precision.native_formats`), and the emulation against them.

On a GPU the bf16, fp16 and dynomp arms run in torch.bfloat16 / torch.float16 tensors. The same code
runs on the CPU when the config names those formats native, so these tests run the GPU's code path
in CI, and check that an emulated format (`VirtualPrecision`, float32 containers rounded after
every operation) computes what that path computes.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from dynomp.evaluate.overlap import dice, mean_over_labels
from dynomp.precision import VirtualPrecision, round_to
from dynomp.registration import pipeline
from dynomp.registration.config import PrecisionConfig, config_from_dict, quick_config
from dynomp.registration.metrics import build_loss, local_cross_correlation
from dynomp.registration.precision import PrecisionSetting
from dynomp.registration.transforms import sample

from .conftest import phantom, volume

SIXTEEN_BIT = ("fp64", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _config(native):
    config = quick_config()
    return dataclasses.replace(config, precision=dataclasses.replace(config.precision, native_formats=native))


@pytest.fixture
def state_dtypes(monkeypatch):
    """The dtypes each level problem holds its images and state in, as the engine runs (a spy that
    calls the real methods)."""
    seen = collections.defaultdict(set)
    for cls, name, attributes in ((pipeline.SymmetricProblem, "step", ("fixed", "moving", "fixed_field")),
                                  (pipeline.LinearProblem, "evaluate", ("fixed", "moving", "parameters"))):
        original = getattr(cls, name)

        def spy(self, *args, _original=original, _attributes=attributes, _kind=cls.__name__, **kwargs):
            for attribute in _attributes:
                seen[f"{_kind}.{attribute}"].add(getattr(self, attribute).dtype)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return seen


@pytest.mark.parametrize("arm", ["bf16", "fp16"])
def test_fixed_16_bit_arms_run_in_their_dtype_where_named_native(deformed_pair, state_dtypes, arm):
    image, labels, moving, moving_labels = deformed_pair
    result = pipeline.register_pair(fixed=volume(image), moving=volume(moving), config=_config(SIXTEEN_BIT),
                                    precision=arm)
    assert result.status == "completed"
    assert {row["format"] for row in result.trace} == {arm}
    assert set(state_dtypes) == {"SymmetricProblem.fixed", "SymmetricProblem.moving",
                                 "SymmetricProblem.fixed_field", "LinearProblem.fixed",
                                 "LinearProblem.moving", "LinearProblem.parameters"}
    assert all(dtypes == {DTYPES[arm]} for dtypes in state_dtypes.values()), dict(state_dtypes)
    # the outputs are float64 whatever the format, and the registration works
    assert result.forward_displacement.dtype == np.float64 and np.isfinite(result.forward_displacement).all()
    before = mean_over_labels(dice(labels, moving_labels))
    after = mean_over_labels(dice(labels, result.warp_moving(moving_labels, labels=True)))
    assert after > before + 0.15, (before, after)


def test_16_bit_arms_are_emulated_in_float32_by_default_on_the_cpu(fixed_pair, state_dtypes):
    image, _ = fixed_pair
    config = _config(None)
    short = dataclasses.replace(config.stages[2], iterations=(2, 0, 0))
    result = pipeline.register_pair(fixed=volume(image), moving=volume(np.roll(image, 1, axis=0)),
                                    config=dataclasses.replace(config, stages=(short,)), precision="bf16")
    assert [row["format"] for row in result.trace] == ["bf16"] * 2
    assert state_dtypes["SymmetricProblem.fixed_field"] == {torch.float32}


def test_dynomp_casts_its_state_to_native_16_bit_dtypes(deformed_pair, state_dtypes):
    image, labels, moving, moving_labels = deformed_pair
    result = pipeline.register_pair(fixed=volume(image), moving=volume(moving), config=_config(SIXTEEN_BIT),
                                    precision="dynomp")
    assert result.status == "completed"
    formats = {row["format"] for row in result.trace}
    assert formats & {"bf16", "fp16"} and "fp64" in formats  # starts in fp64, then goes down
    held = {DTYPES[name] for name in formats & {"bf16", "fp16"}}
    assert held <= state_dtypes["LinearProblem.moving"] | state_dtypes["SymmetricProblem.moving"]
    # dynomp's rigid and affine parameters are master copies in at least fp32
    assert state_dtypes["LinearProblem.parameters"] <= {torch.float32, torch.float64}
    after = mean_over_labels(dice(labels, result.warp_moving(moving_labels, labels=True)))
    assert after > mean_over_labels(dice(labels, moving_labels)) + 0.15


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_emulated_local_cc_computes_what_native_16_bit_tensors_compute(fmt):
    generator = torch.Generator().manual_seed(0)
    # intensities up to 10, correlated: a window's cross term (about 729 x 8) squared passes fp16's
    # 65504, which turned the emulated weights inf and the gradient NaN while fp32 statistics (what
    # a natively 16-bit run computes them in) hold it
    fixed = round_to(10.0 * torch.rand(16, 16, 16, generator=generator), fmt)
    moving = round_to(fixed + torch.rand(16, 16, 16, generator=generator), fmt)
    native = [t.to(DTYPES[fmt]).requires_grad_(True) for t in (fixed, moving)]
    emulated = [t.clone().requires_grad_(True) for t in (fixed, moving)]
    native_loss = local_cross_correlation(*native, radius=4)
    native_gradients = torch.autograd.grad(native_loss * 4096.0, native)
    with VirtualPrecision(fmt):
        emulated_loss = local_cross_correlation(*emulated, radius=4)
        emulated_gradients = torch.autograd.grad(emulated_loss * 4096.0, emulated)
    native_loss, emulated_loss = float(native_loss.detach()), float(emulated_loss.detach())
    assert native_loss == emulated_loss and 0.5 < native_loss < 1.0
    for ours, theirs in zip(emulated_gradients, native_gradients, strict=True):
        assert theirs.dtype == DTYPES[fmt] and torch.isfinite(ours).all()
        assert torch.equal(ours, theirs.float())


@pytest.mark.parametrize(("fmt", "size"), [("bf16", 32), ("fp16", 48)])
def test_an_emulated_syn_iteration_computes_what_native_16_bit_tensors_compute(fmt, size):
    # 48^3 voxels: SyN's loss scale is 2^17, past fp16's 65504, in single precision by design (an
    # emulated fp16 run once rounded its gradient, the scale itself, to inf)
    image, _ = phantom(size)
    fixed = torch.as_tensor(image)
    moving = torch.as_tensor(np.roll(image, 2, axis=0))
    stage = quick_config().stages[2]
    generator = torch.Generator().manual_seed(0)
    fields = [0.5 * torch.randn(3, *fixed.shape, generator=generator, dtype=torch.float64) for _ in range(2)]
    found = {}
    for native in (None, SIXTEEN_BIT):
        setting = PrecisionSetting(fmt, device="cpu", config=PrecisionConfig(native_formats=native))
        problem = pipeline.SymmetricProblem(
            fixed=fixed, moving=moving, fixed_field=fields[0], moving_field=fields[1],
            loss=build_loss("cc", fixed=fixed, moving=moving, radius=stage.cc_radius), stage=stage,
            setting=setting)
        assert problem.loss_scale > 65504 or fmt == "bf16"
        with setting.context():
            loss, gradients = problem.evaluate()
            problem.step(gradients)
        found[native is not None] = [loss, *gradients, *problem.state()]
    assert [t.dtype for t in found[True][1:]] == [DTYPES[fmt]] * 4
    assert [t.dtype for t in found[False][1:]] == [torch.float32] * 4
    emulated, native = ([t.double() for t in found[key]] for key in (False, True))
    # the loss and both fields' gradients: the same bit for bit
    for ours, theirs in zip(emulated[:3], native[:3], strict=True):
        assert torch.isfinite(ours).all() and torch.equal(ours, theirs)
    assert float(native[1].abs().max()) > 0
    # the step: in bf16 the same too; in fp16 torch's half-precision matrix products (the smoothing)
    # sum in another order than float32's, a few values round the other way, and the composition
    # carries that into a few voxels of the fields, by less than a thousandth of a voxel
    for ours, theirs, start in zip(emulated[3:], native[3:], fields, strict=True):
        assert not torch.equal(theirs, start.to(DTYPES[fmt]).double())
        differing = ours != theirs
        if fmt == "bf16":
            assert not differing.any()
        else:
            assert differing.double().mean() < 1e-3
            assert float((ours - theirs).abs().max()) < 1e-3


def test_sample_points_held_wide_keep_an_unrounded_gradient_when_emulated():
    generator = torch.Generator().manual_seed(1)
    image = round_to(torch.rand(12, 12, 12, generator=generator), "bf16")
    points = 11.0 * torch.rand(3, 500, generator=generator)  # fp32 values, not bf16 ones
    weights = round_to(torch.rand(500, generator=generator), "bf16")

    def gradient(volume, grid, *, wide_points):
        values = sample(volume, grid, wide_points=wide_points)
        (found,) = torch.autograd.grad((values * weights.to(values.dtype)).sum(), grid)
        return found

    # natively: a bf16 volume read at fp32 points, whose gradient is fp32 (dynomp's master map)
    native = gradient(image.bfloat16(), points.clone().requires_grad_(True), wide_points=False)
    assert native.dtype == torch.float32
    grids = [points.clone().requires_grad_(True) for _ in range(2)]  # made outside the mode: unrounded
    with VirtualPrecision("bf16"):
        wide = gradient(image.clone(), grids[0], wide_points=True)
        narrow = gradient(image.clone(), grids[1], wide_points=False)
    assert torch.equal(wide, native)
    # points in the step's format (the fixed bf16 arm's map): their gradient is rounded to bf16
    assert torch.equal(narrow, round_to(native, "bf16")) and not torch.equal(narrow, native)


def test_native_formats_key_is_checked(tmp_path):
    config = config_from_dict({"precision": {"native_formats": ["bf16", "fp32"]}}, source="study.yaml")
    assert config.precision.native_formats == ("bf16", "fp32")
    assert PrecisionSetting("bf16", device="cpu", config=config.precision).dtype == torch.bfloat16
    assert PrecisionSetting("bf16", device="cpu", config=PrecisionConfig()).dtype == torch.float32
    assert config_from_dict({}, source="study.yaml").precision.native_formats is None
    with pytest.raises(ValueError, match=r"study.yaml: precision.native_formats: unknown format 'bf61'"):
        config_from_dict({"precision": {"native_formats": ["bf61"]}}, source="study.yaml")
    with pytest.raises(ValueError, match=r"precision.native_formats: torch does not compute in 'fp8-e4m3'"):
        config_from_dict({"precision": {"native_formats": ["fp8-e4m3"]}}, source="study.yaml")
    with pytest.raises(ValueError, match=r"precision.native_formats: expected a list of format names, got 'bf16'"):
        config_from_dict({"precision": {"native_formats": "bf16"}}, source="study.yaml")


def test_cached_filter_constants_are_exact_whoever_builds_them_first():
    from dynomp.registration.pyramid import (
        _gaussian_taps,
        axis_filter_matrix,
        gaussian_kernel,
        smooth,
    )

    sigma = 1.2345  # a kernel no other test builds: the first build happens in the emulated step
    field = torch.rand(3, 9, 10, 11, generator=torch.Generator().manual_seed(2))
    with VirtualPrecision("bf16"):
        smooth(field, sigma, dimensions=3)
        rounded = axis_filter_matrix(11, _gaussian_taps(sigma), edges="replicate", dtype=torch.float32)
    exact = gaussian_kernel(sigma, dtype=torch.float64, device=torch.device("cpu"))
    assert _gaussian_taps(sigma) == tuple(exact.tolist())
    assert not torch.equal(exact, round_to(exact, "bf16"))  # so that the comparison means something
    matrix = axis_filter_matrix(11, _gaussian_taps(sigma), edges="replicate", dtype=torch.float32)
    assert torch.equal(matrix[5, 5 - 4: 5 + 5], exact.float())
    # under the emulated format a copy comes rounded to it, as a bf16 matrix holds its weights
    assert torch.equal(rounded, round_to(matrix, "bf16")) and not torch.equal(rounded, matrix)
