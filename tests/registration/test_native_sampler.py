"""The C sampler (compiled on first use) against the numba kernels it stands in for, and its build."""

from __future__ import annotations

import math
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from dynomp import native
from dynomp.registration import interpolation
from dynomp.registration.transforms import identity_coordinates


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(7)


needs_compiler = pytest.mark.skipif(native.compiler() is None or not native.enabled(),
                                    reason="no C compiler on this machine, or DYNOMP_NATIVE=0")


def sample_both_ways(monkeypatch, function, volume, points, weights):
    """Values and gradient from the C kernels, then from the numba kernels."""
    results = []
    for kernels in (None, {}):  # None: load the C kernels; {}: none, so numba runs
        monkeypatch.setattr(interpolation, "_native_kernels", kernels)
        ours = points.clone().requires_grad_(True)
        values = function(volume, ours)
        (gradient,) = torch.autograd.grad((values * weights).sum(), ours)
        results.append((values.detach(), gradient))
    return results


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(17, 20, 19), (1, 9, 11), (9, 11, 1), (5, 6, 2)])  # x: 1 voxel, 2 voxels
def test_c_sampler_gives_the_numba_kernels_numbers(monkeypatch, generator, dtype, channels, shape):
    assert interpolation.native_kernels(), "a C compiler is here, so the C kernels must load"
    volume = torch.rand(channels, *shape, dtype=dtype, generator=generator)
    # large enough that some points leave the grid and get clamped
    displacement = 3 * torch.randn(3, *shape, dtype=dtype, generator=generator)
    coordinates = (identity_coordinates(shape, dtype=dtype) + displacement).reshape(3, -1)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for function, points in ((interpolation.displaced_sample, displacement),
                             (interpolation.trilinear_sample, coordinates)):
        weights = torch.rand(channels, *points.shape[1:], dtype=dtype, generator=generator)
        (values, gradient), (expected_values, expected_gradient) = sample_both_ways(
            monkeypatch, function, volume, points, weights)
        assert values.dtype == dtype and gradient.dtype == dtype
        assert float((values - expected_values).abs().max()) <= tolerance
        assert float((gradient - expected_gradient).abs().max()) <= tolerance * float(expected_gradient.abs().max())
        # clamped axes get no gradient, the rest do
        assert int((gradient == 0).sum()) > 0 and int((gradient != 0).sum()) > 0.3 * gradient.numel()
        assert torch.equal(gradient == 0, expected_gradient == 0)


@needs_compiler
def test_the_build_is_cached_and_leaves_nothing_half_written(tmp_path):
    first = native.build("registration/sampler", folder=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = native.build("registration/sampler", folder=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert first.name.startswith("registration-sampler-") and first.suffix == ".so"


@needs_compiler
@pytest.mark.parametrize("name", ["registration/sampler", "registration/filters", "precision/statistics"])
def test_each_compiled_source_builds_with_openmp_where_the_compiler_has_it(tmp_path, name):
    # native.build falls back to a serial flag set when the OpenMP one fails: a source that only
    # compiles serially would load and pass every numeric test, one thread at a time
    probe = tmp_path / "probe.c"
    probe.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    if subprocess.run([native.compiler(), *native.OPENMP_FLAGS, str(probe), "-o", str(tmp_path / "probe")],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("this C compiler has no OpenMP")
    flags = native._flag_sets()[0]
    assert all(flag in flags for flag in native.OPENMP_FLAGS)
    built = subprocess.run([native.compiler(), *flags, str(native.SOURCES / f"{name}.c"), "-o", str(tmp_path / "x.so")],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{name}.c with {' '.join(flags)}: {built.stderr.strip()[:500]}"


def test_a_failing_compiler_is_named_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a real program that exits 1
    with pytest.raises(RuntimeError, match=r"sampler\.c: the C compiler failed: exit status 1"):
        native.build("registration/sampler", folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_a_compiler_or_when_switched_off_the_numba_kernels_run(monkeypatch, tmp_path, generator):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(FileNotFoundError, match=r"sampler\.c: no C compiler found"):
        native.build("registration/sampler", folder=tmp_path)
    monkeypatch.setattr(native, "_loaded", {})
    assert native.library("registration/sampler") is None
    monkeypatch.setattr(interpolation, "_native_kernels", None)
    assert interpolation.native_kernels() == {}
    volume = torch.rand(1, 6, 7, 8, dtype=torch.float64, generator=generator)
    centres = identity_coordinates((6, 7, 8), dtype=torch.float64).reshape(3, -1)
    assert torch.allclose(interpolation.trilinear_sample(volume, centres), volume.reshape(1, -1), atol=1e-12)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("DYNOMP_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert not native.enabled() and native.library("registration/sampler") is None


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNOMP_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_folder() == tmp_path / "mine"
    monkeypatch.delenv("DYNOMP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_folder() == tmp_path / "xdg" / "dynomp"
    # a cache home that cannot hold a folder (here a file; in a container, a read-only home)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert native.cache_folder().parent == Path(tempfile.gettempdir())
    assert native.cache_folder().name.startswith("dynomp-native-")


def mattes_inputs(generator, dtype, shape=(17, 20, 19), count=3000):
    """A smooth moving volume, fixed sample points and values, and a 3 x 4 map that sends some of
    the points outside the moving grid (clamped there)."""
    from dynomp.registration.pyramid import smooth
    from dynomp.registration.transforms import sample

    moving = smooth(torch.rand(*shape, dtype=torch.float64, generator=generator), 1.5, dimensions=3) * 100
    points = torch.stack([torch.rand(count, dtype=torch.float64, generator=generator) * (n - 1) for n in shape])
    combined = torch.tensor([[1.05, 0.04, -0.02, 1.5], [0.03, 0.95, 0.05, -1.0], [-0.04, 0.02, 1.1, 0.7]],
                            dtype=torch.float64)
    # the fixed values follow the moving image near the mapped points, with noise
    fixed = 100 - 0.6 * sample(moving, combined[:, :3] @ points + combined[:, 3:] + 0.3)
    fixed = fixed + 3 * torch.rand(count, dtype=torch.float64, generator=generator)
    return moving.to(dtype), points.to(dtype), fixed.to(dtype), combined.to(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_linear_mattes_is_the_sampled_torch_expression(generator, dtype):
    from dynomp.registration.metrics import mutual_information
    from dynomp.registration.parzen import LinearInformation
    from dynomp.registration.transforms import sample

    moving, points, fixed, combined = mattes_inputs(generator, dtype, count=20000)  # split over threads
    ranges = {"fixed_range": (float(fixed.min()), float(fixed.max())),
              "moving_range": (float(moving.min()) + 5, float(moving.max()) - 5)}
    assert LinearInformation.applies(moving, points, fixed, bins=32)
    fused = LinearInformation(moving=moving, points=points, fixed=fixed, bins=32, padding=2, **ranges)
    value, gradient = fused.value_and_gradient(combined.numpy())
    gradient = torch.from_numpy(gradient)
    theirs = combined.clone().requires_grad_(True)
    mapped = theirs[:, :3] @ points + theirs[:, 3:]
    reference = mutual_information(fixed, sample(moving, mapped), bins=32, **ranges)
    (expected,) = torch.autograd.grad(reference, theirs)
    assert gradient.dtype == dtype and gradient.shape == (3, 4)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert 0.3 < float(reference.detach()) < 3.0
    assert abs(value - float(reference.detach())) <= tolerance * float(reference.detach())
    assert float((gradient - expected).abs().max()) <= tolerance * 10 * float(expected.abs().max())
    # some points leave the grid (border-clamped) and some intensities leave the moving range
    assert bool(((mapped < 0) | (mapped > torch.tensor([16, 19, 18], dtype=dtype)[:, None])).any())
    # the same numbers on one thread as on two (per-thread histograms are added up in order)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = fused.value_and_gradient(combined.numpy())
    finally:
        torch.set_num_threads(previous)
    assert abs(single - value) <= tolerance * float(reference.detach())


@needs_compiler
def test_fused_linear_mattes_turns_nan_on_a_nan_or_infinite_map(generator):
    from dynomp.registration.parzen import LinearInformation

    moving, points, fixed, combined = mattes_inputs(generator, torch.float64)
    fused = LinearInformation(moving=moving, points=points, fixed=fixed, bins=32, padding=2,
                              fixed_range=(0.0, 100.0), moving_range=(0.0, 100.0))
    assert math.isfinite(fused.value_and_gradient(combined.numpy())[0])
    for bad in (float("nan"), float("inf")):
        broken = combined.clone()
        broken[1, 2] = bad
        assert math.isnan(fused.value_and_gradient(broken.numpy())[0])
    # a NaN voxel the map reaches turns the value NaN too (the engine then records a divergence)
    moving_with_nan = moving.clone()
    moving_with_nan[8, 10, 9] = float("nan")
    fused = LinearInformation(moving=moving_with_nan, points=points, fixed=fixed, bins=32, padding=2,
                              fixed_range=(0.0, 100.0), moving_range=(0.0, 100.0))
    assert math.isnan(fused.value_and_gradient(combined.numpy())[0])
    # only 3-D CPU float32/float64 volumes, and no more bins than the kernel's tables hold
    assert not LinearInformation.applies(moving, points, fixed, bins=512)
    assert not LinearInformation.applies(moving[0], points[:2], fixed, bins=32)
    assert not LinearInformation.applies(moving.half(), points.half(), fixed.half(), bins=32)


@needs_compiler
@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_a_linear_level_gives_the_same_loss_and_gradient_fused_or_not(generator, kind):
    """LinearProblem.evaluate through the fused kernel against its torch operations, both formats."""
    from types import SimpleNamespace

    from dynomp.registration import pipeline
    from dynomp.registration.config import PrecisionConfig
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.precision import PrecisionSetting
    from dynomp.registration.pyramid import smooth

    shape = (20, 22, 18)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.5, 1.0], dtype=torch.float64))
    fixed = smooth(torch.rand(*shape, dtype=torch.float64, generator=generator), 1.5, dimensions=3)
    moving = smooth(torch.rand(*shape, dtype=torch.float64, generator=generator), 1.5, dimensions=3)
    images = pipeline._Images(fixed=SimpleNamespace(data=fixed, affine=affine),
                              moving=SimpleNamespace(data=moving, affine=affine))
    center = torch.tensor([19.0, 21.0, 21.25], dtype=torch.float64)
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] = pipeline.rotation_matrix(torch.tensor([0.05, -0.03, 0.08], dtype=torch.float64))
    transform[:3, 3] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    parameters = pipeline._initial_parameters(kind, transform, center, 3)
    for arm, tolerance in (("fp64", 1e-12), ("fp32", 1e-4)):
        loss = build_loss("mi", fixed=fixed, moving=moving, bins=32, sampling_fraction=0.25, seed=3)
        problem = pipeline.LinearProblem(
            kind=kind, images=images, parameters=parameters, center=center, loss=loss, learning_rate=0.25,
            setting=PrecisionSetting(arm, device="cpu", config=PrecisionConfig()), relaxation=0.5,
        )
        assert problem.information is not None
        value, (gradient,) = problem.evaluate()
        problem.information = None
        expected_value, (expected,) = problem.evaluate()
        assert gradient.dtype == expected.dtype == problem.parameters.dtype
        assert abs(float(value) - float(expected_value)) <= tolerance * abs(float(expected_value))
        assert float((gradient - expected).abs().max()) <= tolerance * float(expected.abs().max())
        assert float(expected.abs().max()) > 0
    with pytest.raises(ValueError, match="parameters: a rigid transform takes 6 values, got 12"):
        problem.information = pipeline.LinearInformation(
            moving=problem.moving, points=problem.points, fixed=problem.fixed, bins=32, padding=2,
            fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0),
            geometry=(center, problem.moving_inverse, problem.fixed_affine),
        )
        problem.information.loss_and_gradient(torch.zeros(12, dtype=torch.float32), "rigid")


def smooth_field(generator, shape, dtype, amplitude):
    """A smooth random displacement field (3, *shape): a few low-frequency sines per component."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n, dtype=torch.float64) for n in shape],
                                      indexing="ij"))
    phases = torch.rand(3, 3, generator=generator, dtype=torch.float64) * 2 * math.pi
    field = torch.stack([sum(torch.sin(math.pi * (1 + a) * grid[a] + phases[c, a]) for a in range(3))
                         for c in range(3)])
    return (amplitude / 3 * field).to(dtype)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(9, 11, 7), (40, 41, 39)])  # one thread; split over threads
def test_compiled_inversion_gives_the_torch_iterations_numbers(monkeypatch, generator, dtype, shape):
    from dynomp.registration.transforms import invert, warp

    amplitude = 0.08 * min(shape)  # voxels: the map stays invertible (|du/dx| about 0.25)
    field = smooth_field(generator, shape, dtype, amplitude=amplitude)
    initial = -0.9 * field
    kept = initial.clone()
    ours = invert(field, iterations=30, damping=0.5, initial=initial, method="damped")
    assert torch.equal(initial, kept), "the compiled path steps its own copy of `initial`"
    monkeypatch.setattr(interpolation, "_native_kernels", {})  # no C kernels: torch operations (and numba)
    assert interpolation.inversion_kernel(field, field) is None
    reference = invert(field, iterations=30, damping=0.5, initial=initial, method="damped")
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert ours.dtype == dtype and ours.shape == field.shape
    assert float((ours - reference).abs().max()) <= tolerance * amplitude
    # and it is an inverse: u(x + v(x)) + v(x) is small inside the grid
    residual = (warp(field.to(torch.float64), ours.to(torch.float64)) + ours.to(torch.float64))
    assert float(residual[:, 2:-2, 2:-2, 2:-2].abs().max()) < 1e-3


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(9, 11, 7), (40, 41, 39)])
def test_newton_inversion_converges_in_a_few_steps_compiled_and_in_torch(monkeypatch, generator, dtype, shape):
    from dynomp.registration.transforms import invert, warp

    # |du/dx| up to about 0.5: the damped iteration's error shrinks by at most 0.75 a step there
    amplitude = 0.16 * min(shape)
    field = smooth_field(generator, shape, dtype, amplitude=amplitude)

    def residual(inverse):
        wide = inverse.to(torch.float64)
        return float((warp(field.to(torch.float64), wide) + wide).abs().max())

    floor = 1e-9 if dtype == torch.float64 else 1e-4  # float32 coordinates near 40 step by 4e-6
    compiled = invert(field, iterations=6)
    assert compiled.dtype == dtype and residual(compiled) < floor
    assert residual(invert(field, iterations=6, method="damped")) > 100 * floor
    # one Newton step is the compiled pass with `newton`
    out = torch.empty_like(field)
    change = interpolation.inversion_step(field, (-field).contiguous(), out, 0.5, newton=True)
    assert change == pytest.approx(float((warp(field, -field) - field).abs().max()), rel=1e-5)
    assert torch.equal(out, invert(field, iterations=1))
    # the torch operations (J from the interpolant's partials too) take the same steps, to rounding
    monkeypatch.setattr(interpolation, "_native_kernels", {})
    reference = invert(field, iterations=6)
    assert residual(reference) < floor
    assert float((reference - compiled).abs().max()) < floor


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(9, 11, 7), (40, 41, 39)])
def test_syn_step_fused_equals_its_torch_operations_bit_for_bit(monkeypatch, generator, dtype, shape):
    from dynomp.registration.config import PrecisionConfig, quick_config
    from dynomp.registration.metrics import build_loss
    from dynomp.registration.pipeline import SymmetricProblem
    from dynomp.registration.precision import PrecisionSetting
    from dynomp.registration.transforms import compose

    field = smooth_field(generator, shape, dtype, amplitude=0.1 * min(shape))
    direction = smooth_field(generator, shape, dtype, amplitude=1.0)
    squares = float((direction * direction).sum(0).max())
    assert interpolation.update_norm(direction) == squares > 0
    scale = float(torch.tensor(-0.25, dtype=dtype) / torch.tensor(squares, dtype=dtype).sqrt())
    assert torch.equal(interpolation.compose_scaled(field, direction, scale), compose(field, direction * scale))
    broken = direction.clone()
    broken[2, 3, 4, 5] = math.nan
    assert math.isnan(interpolation.update_norm(broken))
    with pytest.raises(ValueError, match=r"compose_scaled: needs contiguous CPU float32/float64"):
        interpolation.compose_scaled(field, direction.to(torch.float64 if dtype == torch.float32 else torch.float32), 1.0)
    # SyN's whole step, fused and as torch operations
    image = smooth_field(generator, shape, torch.float64, amplitude=1.0)[0]
    stage = quick_config().stages[2]
    setting = PrecisionSetting("fp64" if dtype == torch.float64 else "fp32", device="cpu", config=PrecisionConfig())
    loss = build_loss("cc", fixed=image, moving=image.roll(1, 0), radius=stage.cc_radius)

    def stepped():
        problem = SymmetricProblem(fixed=image, moving=image.roll(1, 0), fixed_field=field, moving_field=-field,
                                   loss=loss, stage=stage, setting=setting)
        problem.step(problem.evaluate()[1])
        return problem.state()

    fused = stepped()
    monkeypatch.setattr("dynomp.registration.pipeline.update_kernels", lambda *fields: False)
    plain = stepped()
    assert all(f.dtype == dtype and torch.equal(f, p) for f, p in zip(fused, plain, strict=True))
    assert float((fused[0] - field).abs().max()) > 0


@needs_compiler
def test_compiled_inversion_step_returns_the_largest_move_and_flags_nan(generator):
    field = smooth_field(generator, (10, 12, 9), torch.float64, amplitude=1.5)
    inverse, out = (-field).contiguous(), torch.empty_like(field)
    change = interpolation.inversion_step(field, inverse, out, 0.5)
    from dynomp.registration.transforms import warp

    step = -warp(field, inverse) - inverse
    assert change == pytest.approx(float(step.abs().max()), rel=1e-12)
    assert torch.allclose(out, inverse + 0.5 * step, atol=1e-14)
    broken = field.clone()
    broken[1, 4, 5, 6] = math.nan
    assert math.isnan(interpolation.inversion_step(broken, inverse, out, 0.5))
    with pytest.raises(ValueError, match=r"inversion_step: needs contiguous CPU float32/float64"):
        interpolation.inversion_step(field, inverse.to(torch.float32), out, 0.5)
