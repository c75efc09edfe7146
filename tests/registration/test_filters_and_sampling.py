"""The fast paths of the engine against the plain formulas they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynomp.registration.metrics import (
    box_count,
    box_sum,
    cubic_bspline,
    joint_histogram,
    mutual_information,
    parzen_taps,
    parzen_weights,
)
from dynomp.registration.pyramid import axis_filter_matrix, gaussian_kernel, smooth
from dynomp.registration.transforms import identity_coordinates, invert, sample, warp


def convolve_separably(volume: torch.Tensor, kernels: list[torch.Tensor | None], *, edges: str) -> torch.Tensor:
    """Reference: pad each axis (replicate or zeros) and convolve with its 1-D kernel."""
    dimensions = len(kernels)
    spatial = volume.shape[-dimensions:]
    batch = volume.reshape(-1, 1, *spatial)
    convolution = F.conv3d if dimensions == 3 else F.conv2d
    for axis, kernel in enumerate(kernels):
        if kernel is None:
            continue
        radius = kernel.numel() // 2
        padding = [0, 0] * dimensions
        padding[2 * (dimensions - 1 - axis)] = radius
        padding[2 * (dimensions - 1 - axis) + 1] = radius
        mode = "replicate" if edges == "replicate" else "constant"
        batch = F.pad(batch, padding, mode=mode)
        shape = [1] * dimensions
        shape[axis] = kernel.numel()
        batch = convolution(batch, kernel.reshape(1, 1, *shape))
    return batch.reshape(volume.shape)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(3)


def test_smooth_matches_replicate_padded_convolution(generator):
    field = torch.rand(3, 11, 14, 9, dtype=torch.float64, generator=generator)
    sigmas = [1.2, 0.0, 2.5]
    kernels = [gaussian_kernel(s, dtype=torch.float64, device="cpu") if s > 0 else None for s in sigmas]
    expected = convolve_separably(field, kernels, edges="replicate")
    assert torch.allclose(smooth(field, sigmas, dimensions=3), expected, atol=1e-13)
    # a kernel wider than the axis (radius 9 on 9 voxels) still replicates the edge values
    image = torch.rand(9, 13, dtype=torch.float64, generator=generator)
    wide = gaussian_kernel(3.0, dtype=torch.float64, device="cpu")
    assert torch.allclose(smooth(image, 3.0, dimensions=2),
                          convolve_separably(image, [wide, wide], edges="replicate"), atol=1e-13)


def test_box_sum_matches_zero_padded_convolution_and_counts(generator):
    volume = torch.rand(2, 10, 12, 7, dtype=torch.float64, generator=generator)
    ones = torch.ones(5, dtype=torch.float64)
    expected = convolve_separably(volume, [ones, ones, ones], edges="zeros")
    assert torch.allclose(box_sum(volume, radius=2, dimensions=3), expected, atol=1e-12)
    count = box_count((10, 12, 7), radius=2, dtype=torch.float64, device=torch.device("cpu"))
    assert torch.equal(count, box_sum(torch.ones(10, 12, 7, dtype=torch.float64), radius=2))
    assert float(count[0, 0, 0]) == 27.0 and float(count[5, 5, 3]) == 125.0


def test_axis_matrix_rejects_unknown_edges():
    with pytest.raises(ValueError, match="edges: unknown mode 'wrap'"):
        axis_filter_matrix(5, [1.0, 1.0, 1.0], edges="wrap", dtype=torch.float64)


def test_parzen_taps_are_the_dense_kernel_at_four_bins(generator):
    values = torch.rand(500, dtype=torch.float64, generator=generator) * 4 - 1
    # the ends of the range and values exactly on bin centres
    values[:4] = torch.tensor([-1.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    bins = 32
    position = ((values + 1) * ((bins - 5) / 4.0) + 2).clamp(2, bins - 3)
    dense = cubic_bspline(position.unsqueeze(-1) - torch.arange(bins, dtype=torch.float64))
    assert torch.allclose(parzen_weights(values, low=-1.0, high=3.0, bins=bins), dense, atol=1e-15)
    first_bin, weights = parzen_taps(values, low=-1.0, high=3.0, bins=bins)
    assert int(first_bin.min()) >= 1 and int(first_bin.max()) + 3 <= bins - 1
    assert torch.allclose(weights.sum(1), torch.ones(500, dtype=torch.float64), atol=1e-15)


def test_joint_histogram_is_the_dense_product_and_mi_has_the_analytic_gradient(generator):
    fixed = torch.rand(300, dtype=torch.float64, generator=generator)
    moving = fixed**2 + 0.2 * torch.rand(300, dtype=torch.float64, generator=generator)
    bins = 16
    joint = joint_histogram(parzen_taps(fixed, low=0.0, high=1.0, bins=bins),
                            parzen_taps(moving, low=0.0, high=1.2, bins=bins), bins=bins)
    dense = (parzen_weights(fixed, low=0.0, high=1.0, bins=bins).T
             @ parzen_weights(moving, low=0.0, high=1.2, bins=bins))
    assert torch.allclose(joint, dense / dense.sum(), atol=1e-15)
    moving = moving[:40].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda m: mutual_information(fixed[:40], m, bins=bins, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.2)),
        (moving,),
    )


def test_sample_at_a_list_of_points_equals_sampling_the_grid(generator):
    volume = torch.rand(2, 8, 9, 10, dtype=torch.float64, generator=generator)
    coordinates = torch.rand(3, 4, 5, 6, dtype=torch.float64, generator=generator) * 7
    on_grid = sample(volume, coordinates)
    as_points = sample(volume, coordinates.reshape(3, -1))
    assert as_points.shape == (2, 120)
    assert torch.allclose(as_points, on_grid.reshape(2, -1), atol=1e-15)
    # at voxel centres, trilinear sampling returns the voxel values
    centres = identity_coordinates((8, 9, 10), dtype=torch.float64)
    assert torch.allclose(sample(volume, centres), volume, atol=1e-12)


def test_identity_grid_is_cached_on_request_and_holds_the_indices():
    first = identity_coordinates((3, 4), dtype=torch.float32, cached=True)
    assert first is identity_coordinates([3, 4], dtype=torch.float32, cached=True)
    assert first[0, 2, 1] == 2 and first[1, 2, 1] == 1
    # one-off callers get their own grid, and the cache keeps the two most recent grids only
    assert identity_coordinates((3, 4), dtype=torch.float32) is not first
    identity_coordinates((5, 4), dtype=torch.float32, cached=True)
    identity_coordinates((6, 4), dtype=torch.float32, cached=True)
    assert identity_coordinates((3, 4), dtype=torch.float32, cached=True) is not first


def test_inversion_stops_at_its_tolerance():
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 16, dtype=torch.float64)] * 3, indexing="ij"))
    field = 1.2 * torch.sin(torch.pi * grid[[1, 2, 0]])
    exact = invert(field, iterations=60)
    close = invert(field, iterations=60, tolerance=1e-6)
    assert (close - exact).abs().max() < 1e-5
    # a tolerance larger than any residual stops before the first step: the initial guess -u
    assert torch.equal(invert(field, iterations=60, tolerance=100.0), -field)
    assert torch.equal(invert(field, iterations=60, tolerance=100.0), invert(field, iterations=0))


def test_inversion_converges_where_the_map_stretches_more_than_twofold():
    # u_z = 6 tanh((z - c) / 4): du/dz reaches 1.5, the map stretches 2.5x at the centre. The plain
    # fixed-point iteration (damping 1) converges only where du/dz < 1, and oscillates here; the
    # damped one converges where du/dz < 3.
    size = 32
    z = torch.arange(size, dtype=torch.float64)
    profile = 6.0 * torch.tanh((z - (size - 1) / 2) / 4.0)
    field = torch.zeros(3, size, 6, 5, dtype=torch.float64)
    field[0] = profile[:, None, None]
    interior = (slice(None), slice(8, -8))

    def residual(inverse):
        return float((warp(field, inverse) + inverse)[interior].abs().max())

    assert residual(invert(field, iterations=60, damping=1.0, method="damped")) > 0.5
    damped = invert(field, iterations=60, method="damped")
    assert residual(damped) < 1e-6
    assert torch.allclose(damped[1:], torch.zeros_like(damped[1:]))
    # Newton's iteration gets there in a handful of steps
    assert residual(invert(field, iterations=6)) < 1e-6 < residual(invert(field, iterations=6, method="damped"))
    with pytest.raises(ValueError, match=r"damping: 1.5 is outside \(0, 1\]"):
        invert(field, damping=1.5)
    with pytest.raises(ValueError, match=r"method: unknown inversion method 'fixed' \(known: newton, damped\)"):
        invert(field, method="fixed")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_sampler_matches_grid_sample_values_and_gradient(generator, dtype):
    volume = smooth(torch.rand(2, 9, 11, 8, dtype=torch.float64, generator=generator), 1.0, dimensions=3)
    # points inside, on the last voxel, and beyond every border (clamped: border padding)
    inside = torch.rand(3, 200, dtype=torch.float64, generator=generator) * torch.tensor([[8.0], [10.0], [7.0]])
    edges = torch.tensor([[8.0, -2.5, 3.3, 12.0], [10.0, 4.2, -0.7, 3.0], [7.0, 2.0, 9.5, -4.0]], dtype=torch.float64)
    points = torch.cat([inside, edges], dim=1)
    volume, points = volume.to(dtype), points.to(dtype)
    batch = volume.unsqueeze(0)
    scale = torch.tensor([2.0 / 7, 2.0 / 10, 2.0 / 8], dtype=dtype)  # x, y, z
    grid = (points.flip(0).T * scale - 1.0).reshape(1, -1, 1, 1, 3)
    expected = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=True)
    values = sample(volume, points)
    assert values.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(values, expected.reshape(2, -1), atol=tolerance)

    weights = torch.rand(2, points.shape[1], dtype=dtype, generator=generator)
    ours = points.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad((sample(volume, ours) * weights).sum(), ours)
    theirs = grid.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(
        (F.grid_sample(batch, theirs, mode="bilinear", padding_mode="border", align_corners=True).reshape(2, -1)
         * weights).sum(), theirs)
    reference = reference.reshape(-1, 3).flip(1).T * scale.flip(0)[:, None]
    # inside the grid the gradients agree; on a clamped axis the value does not move
    assert torch.allclose(gradient[:, :200], reference[:, :200], atol=tolerance * 10)
    assert gradient[1, 201] != 0 and gradient[0, 201] == 0  # z clamped at -2.5, y inside
    assert gradient[2, 203] == 0 and gradient[0, 203] == 0  # z and x beyond the grid


def test_compiled_sampler_is_bypassed_where_it_would_differ(generator):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.registration.transforms import _compiled_kernel_applies

    volume = torch.rand(5, 6, 7, dtype=torch.float64, generator=generator)
    points = torch.rand(3, 10, dtype=torch.float64, generator=generator) * 4
    assert _compiled_kernel_applies(volume, points, mode="bilinear", padding="border")
    assert not _compiled_kernel_applies(volume, points, mode="nearest", padding="border")
    assert not _compiled_kernel_applies(volume, points, mode="bilinear", padding="zeros")
    assert not _compiled_kernel_applies(volume.requires_grad_(True), points, mode="bilinear", padding="border")
    volume = volume.detach()
    # an emulated format rounds every torch op: the kernel is not one, so grid_sample runs there
    with VirtualPrecision("bf16"):
        assert not _compiled_kernel_applies(volume, points, mode="bilinear", padding="border")
        values = sample(volume.float(), points.float())
    assert torch.equal(values, values.bfloat16().float())


def test_local_cross_correlation_gradient_is_the_derivative_of_its_value(generator):
    from dynomp.registration.metrics import local_cross_correlation

    fixed = smooth(torch.rand(6, 7, 5, dtype=torch.float64, generator=generator), 0.8, dimensions=3)
    moving = 0.4 * fixed + smooth(torch.rand(6, 7, 5, dtype=torch.float64, generator=generator), 0.8, dimensions=3)
    fixed[:2] = 0.3  # a flat slab: zero variance, the epsilon's regime
    inputs = (fixed.requires_grad_(True), moving.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda f, m: local_cross_correlation(f, m, radius=1), inputs)
    # 2-D, and one input only
    image = torch.rand(9, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    other = torch.rand(9, 8, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda m: local_cross_correlation(other, m, radius=2), (image,))
    # a window where the two images are proportional has correlation 1 (the clamp's edge)
    value = local_cross_correlation(other, 3.0 * other, radius=2)
    assert 0.99 < float(value) <= 1.0


def test_freed_heap_pages_go_back_to_the_system():
    from dynomp.heap import _malloc_trim, release_free_memory

    if _malloc_trim() is None:
        pytest.skip("the C library has no malloc_trim (not glibc)")

    def resident_mb() -> float:
        with open("/proc/self/status") as status:
            return int(status.read().split("VmRSS:")[1].split()[0]) / 1024

    # 300 blocks of 96 KiB: below glibc's mmap threshold, so they live on the heap; every other one
    # stays alive, so the heap cannot simply shrink from its top when the rest are freed
    blocks = [torch.ones(12 * 1024, dtype=torch.float64) for _ in range(300)]
    del blocks[::2]
    before = resident_mb()
    release_free_memory()
    assert resident_mb() < before - 8.0


_HEAP_PROBE = """
import json, resource, torch
from dynomp.heap import reused_heap

def faults_per_round(rounds=8):
    # 40 MiB, above glibc's largest mmap threshold: by default a fresh mapping every time
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(5 * 2**20, dtype=torch.float64)
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

def resident_mb():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024

found = {"outside": faults_per_round()}
with reused_heap():
    found["inside"] = faults_per_round(24)
    found["holding"] = resident_mb()
found["released"] = resident_mb()
with reused_heap():
    with reused_heap():
        faults_per_round(3)
    # the inner context left, the outer one still holds the settings and the pages
    found["after_inner"] = faults_per_round(4)
try:
    with reused_heap():
        faults_per_round(2)
        found["holding_before_error"] = resident_mb()
        raise RuntimeError("inside")
except RuntimeError:
    found["released_after_error"] = resident_mb()
print(json.dumps(found))
"""


def test_a_registration_reuses_freed_pages_and_hands_them_back_at_the_end():
    import json
    import subprocess
    import sys

    from dynomp.heap import _libc_function

    if _libc_function("mallopt") is None:
        pytest.skip("the C library has no mallopt (not glibc)")
    # a fresh process: where glibc puts a block depends on the heap's free lists, which the tests
    # before this one would have left in any state
    found = json.loads(subprocess.run([sys.executable, "-c", _HEAP_PROBE], check=True, capture_output=True,
                                      text=True).stdout)
    # outside: every round touches 10,240 new pages
    assert min(found["outside"]) > 8000
    # inside: pages once touched are reused. For the first rounds a round may take a block of its
    # own rather than the one the round before freed (torch asks for a little more than that
    # block's size, to align), so some rounds touch new pages; once the heap has settled, none do
    assert found["inside"][0] > 8000 and max(found["inside"][-6:]) < 500
    # nested (or in several threads), the last to leave restores the defaults
    assert max(found["after_inner"]) < 500
    # on leaving, after an error too, the pages kept go back to the system
    assert found["released"] < found["holding"] - 30.0
    assert found["released_after_error"] < found["holding_before_error"] - 30.0


def test_work_is_split_over_torch_threads_and_covers_every_point_once():
    from dynomp.threads import run_split

    calls = []
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        results = run_split(lambda name, start, stop: (name, start, stop), "volume", points=40000)
        assert results == [("volume", 0, 20000), ("volume", 20000, 40000)]  # in chunk order
        calls.clear()
        run_split(lambda *arguments: calls.append(arguments), "volume", points=40000)
        assert sorted(calls) == [("volume", 0, 20000), ("volume", 20000, 40000)]
        calls.clear()
        # a small call stays on the calling thread: a hand-off costs more than the work
        run_split(lambda *arguments: calls.append(arguments), "volume", points=500)
        assert calls == [("volume", 0, 500)]
        calls.clear()
        torch.set_num_threads(1)
        run_split(lambda *arguments: calls.append(arguments), "volume", points=40000)
        assert calls == [("volume", 0, 40000)]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_sampler_equals_the_single_thread_sampler(generator, dtype):
    volume = torch.rand(3, 30, 34, 32, dtype=dtype, generator=generator)
    points = (identity_coordinates((30, 34, 32), dtype=dtype)
              + 3 * torch.randn(3, 30, 34, 32, dtype=dtype, generator=generator)).reshape(3, -1)
    weights = torch.rand(3, points.shape[1], dtype=dtype, generator=generator)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ours = points.clone().requires_grad_(True)
            values = sample(volume, ours)
            (gradient,) = torch.autograd.grad((values * weights).sum(), ours)
            results.append((values.detach(), gradient))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert float(results[0][1].abs().sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_mutual_information_is_the_torch_expression(generator, dtype):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.registration.metrics import (
        _compiled_information_applies,
        mutual_information_of_histogram,
    )

    fixed = torch.rand(5000, dtype=torch.float64, generator=generator) * 100
    moving = (0.7 * fixed + 20 * torch.rand(5000, dtype=torch.float64, generator=generator)).to(dtype)
    fixed = fixed.to(dtype)
    # the moving range leaves some intensities outside it: clamped, they get no gradient
    fixed_range, moving_range = (0.0, 100.0), (10.0, 80.0)
    assert _compiled_information_applies(fixed, moving)
    ours = moving.clone().requires_grad_(True)
    value = mutual_information(fixed, ours, bins=32, fixed_range=fixed_range, moving_range=moving_range)
    (gradient,) = torch.autograd.grad(value, ours)
    theirs = moving.clone().requires_grad_(True)
    reference = mutual_information_of_histogram(joint_histogram(
        parzen_taps(fixed, low=fixed_range[0], high=fixed_range[1], bins=32),
        parzen_taps(theirs, low=moving_range[0], high=moving_range[1], bins=32), bins=32))
    (expected,) = torch.autograd.grad(reference, theirs)
    assert value.dtype == dtype and gradient.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(value.detach()) - float(reference.detach())) <= tolerance * float(reference.detach())
    assert float((gradient - expected).abs().max()) <= tolerance * float(expected.abs().max())
    clamped = (moving < moving_range[0]) | (moving > moving_range[1])
    assert int(clamped.sum()) > 100 and torch.all(gradient[clamped] == 0)
    assert int((gradient[~clamped] != 0).sum()) > 0.9 * int((~clamped).sum())
    # under an emulated format the torch expression runs, so that every operation is rounded
    with VirtualPrecision("bf16"):
        assert not _compiled_information_applies(fixed.float(), moving.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_warp_samples_at_identity_plus_displacement_without_building_coordinates(generator, dtype):
    from dynomp.registration.transforms import warp

    shape = (12, 15, 11)
    volume = torch.rand(2, *shape, dtype=dtype, generator=generator)
    # large enough that some points leave the grid and get clamped
    displacement = 4 * torch.randn(3, *shape, dtype=dtype, generator=generator)
    weights = torch.rand(2, *shape, dtype=dtype, generator=generator)
    ours = displacement.clone().requires_grad_(True)
    values = warp(volume, ours)
    (gradient,) = torch.autograd.grad((values * weights).sum(), ours)
    theirs = displacement.clone().requires_grad_(True)
    expected = sample(volume, identity_coordinates(shape, dtype=dtype) + theirs)
    (reference,) = torch.autograd.grad((expected * weights).sum(), theirs)
    assert values.shape == (2, *shape) and values.dtype == dtype
    assert torch.equal(values, expected.detach()) and torch.equal(gradient, reference)
    assert int((gradient == 0).sum()) > 0 and int((gradient != 0).sum()) > 0.5 * gradient.numel()
    with pytest.raises(ValueError, match=r"displaced_sample: expected \(C, D, H, W\) and \(3, D, H, W\)"):
        from dynomp.registration.interpolation import displaced_sample

        displaced_sample(volume, displacement[:2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_three_component_field_samples_as_its_components_do(generator, dtype):
    from dynomp.registration.transforms import warp

    shape = (9, 12, 10)
    field = torch.rand(3, *shape, dtype=dtype, generator=generator)
    displacement = 3 * torch.randn(3, *shape, dtype=dtype, generator=generator)
    points = (torch.rand(3, 300, dtype=dtype, generator=generator) * 14 - 2)
    # one cell lookup serves all three components: the same numbers as one component at a time
    assert torch.equal(warp(field, displacement), torch.stack([warp(c, displacement) for c in field]))
    assert torch.equal(sample(field, points), torch.stack([sample(c, points) for c in field]))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_mutual_information_under_a_16_bit_format_stays_finite_and_near_fp32(generator, fmt):
    from dynomp.precision.dispatch import VirtualPrecision

    # 2000 samples in 32 x 32 bins: most products of two marginals lie below fp16's 6e-5, and a
    # bin of a 16-bit histogram stops growing after 256 (bf16) or 2048 (fp16) equal weights
    fixed = torch.rand(2000, generator=generator)
    moving = (0.6 * fixed + 0.4 * torch.rand(2000, generator=generator))
    ranges = {"fixed_range": (0.0, 1.0), "moving_range": (0.0, 1.0)}
    reference_moving = moving.clone().requires_grad_(True)
    with VirtualPrecision("fp32"):  # the torch expression, unrounded
        reference = mutual_information(fixed, reference_moving, bins=32, **ranges)
    (expected,) = torch.autograd.grad(reference, reference_moving)
    ours = moving.clone().requires_grad_(True)
    with VirtualPrecision(fmt):
        value = mutual_information(fixed, ours, bins=32, **ranges)
        (gradient,) = torch.autograd.grad(value, ours)
    assert torch.isfinite(value) and torch.isfinite(gradient).all()
    # the per-sample weights carry the format's rounding, the histogram and MI do not
    assert abs(float(value.detach()) - float(reference.detach())) < 0.02 * float(reference.detach())
    cosine = float((gradient * expected).sum() / (gradient.norm() * expected.norm()))
    assert cosine > 0.95


def test_local_cc_gradient_under_fp16_is_neither_zero_nor_subnormal(generator):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.registration.metrics import build_loss

    from .conftest import phantom

    # the phantom's edges give windows with variances near 100: times 4096 voxels, past 65504
    image, _ = phantom(16)
    fixed = torch.from_numpy(image).float()
    moving = torch.from_numpy(np.roll(image, 1, axis=0)).float()
    loss = build_loss("cc", fixed=fixed, moving=moving, radius=4)
    scale = 2.0 ** 12  # SymmetricProblem's scale for 16^3 voxels
    reference_moving = moving.clone().requires_grad_(True)
    with VirtualPrecision("fp32"):
        (expected,) = torch.autograd.grad(loss(fixed, reference_moving), reference_moving, torch.tensor(scale))
    ours = moving.clone().requires_grad_(True)
    with VirtualPrecision("fp16"):
        value = loss(fixed, ours)
        (gradient,) = torch.autograd.grad(value, ours, torch.tensor(scale))
    # the count times a window's variances passes 65504: divided by it, every weight was zero
    assert torch.isfinite(gradient).all() and float(gradient.abs().max()) > 1e-3
    cosine = float((gradient * expected).sum() / (gradient.norm() * expected.norm()))
    assert cosine > 0.99
    assert abs(float(value.detach()) - float(loss(fixed, moving))) < 1e-2 * abs(float(loss(fixed, moving)))


@pytest.mark.parametrize("held", ["emulated", "native"])
def test_16_bit_warps_sample_at_single_precision_points(held):
    from dynomp.precision.dispatch import VirtualPrecision
    from dynomp.precision.rounding import round_to

    # values x - 70 along the last axis: 0.3 voxels past voxel 70 reads 0.3. In bf16 the point
    # 70 + 0.3 would be 70.5 (8 significant bits), and [-1, 1] steps by 1/256 of the axis
    ramp = (torch.arange(80, dtype=torch.float32) - 70.0).expand(2, 3, 80).contiguous()
    shift = torch.zeros(3, 2, 3, 80)
    shift[2] = 0.3
    if held == "emulated":
        with VirtualPrecision("bf16"):
            warped = warp(ramp, round_to(shift, "bf16"))
            listed = sample(ramp, round_to(torch.tensor([[1.0], [1.0], [70.3]]), "bf16"))
    else:  # natively 16-bit tensors, as on a GPU
        warped = warp(ramp.bfloat16(), shift.bfloat16())
        listed = sample(ramp.bfloat16(), torch.tensor([[1.0], [1.0], [70.3]], dtype=torch.bfloat16))
        assert warped.dtype == listed.dtype == torch.bfloat16
    # the value itself is rounded to bf16 (0.30078125); the point was not
    assert float(warped[1, 1, 70]) == pytest.approx(0.3, abs=2e-3)
    # bf16 holds 70.3 as 70.5: the rounded point is sampled in fp32 without further loss
    assert float(listed[0]) == pytest.approx(0.5, abs=2e-3)
    assert float(warped[1, 1, 10]) == pytest.approx(-59.7, abs=0.25)
