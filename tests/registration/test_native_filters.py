"""The C separable filter (compiled on first use) against scipy, the matrix products it stands in
for, and its fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dynomp import native
from dynomp.precision.dispatch import VirtualPrecision
from dynomp.registration import pyramid
from dynomp.registration.metrics import box_sum
from dynomp.registration.pyramid import (
    axis_filter_matrix,
    filter_axes,
    gaussian_kernel,
    separable_filter,
    smooth,
)

needs_compiler = pytest.mark.skipif(native.compiler() is None or not native.enabled(),
                                    reason="no C compiler on this machine, or DYNOMP_NATIVE=0")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(11)


def scipy_filter(volume: np.ndarray, kernels: list[list[float] | None], edges: str) -> np.ndarray:
    """The reference: scipy's 1-D correlation along each of the last len(kernels) axes."""
    mode = "nearest" if edges == "replicate" else "constant"
    result = volume.astype(np.float64)
    first = volume.ndim - len(kernels)
    for axis, kernel in enumerate(kernels):
        if kernel is not None:
            result = ndimage.correlate1d(result, np.asarray(kernel), axis=first + axis, mode=mode, cval=0.0)
    return result


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("edges", ["replicate", "zeros"])
@pytest.mark.parametrize("shape", [(3, 21, 18, 40), (2, 7, 1, 5), (1, 3, 70, 2), (2, 19, 33)])
def test_c_filter_gives_scipy_numbers(generator, dtype, edges, shape):
    assert pyramid.filter_kernels(), "a C compiler is here, so the C filter must load"
    dimensions = len(shape) - 1
    volume = torch.rand(*shape, dtype=torch.float64, generator=generator).to(dtype)
    # a Gaussian wider than some axes (radius 9 on axes of 1-7 voxels), a box, a kernel without symmetry
    for kernels in ([gaussian_kernel(3.0, dtype=torch.float64, device="cpu").tolist()] * dimensions,
                    [[1.0] * 9] * dimensions,
                    [[0.5, -1.0, 2.0], None, [1.0, 0.25, 3.0, -0.5, 0.125]][:dimensions]):
        ours = separable_filter(volume, kernels, edges=edges, dimensions=dimensions)
        expected = scipy_filter(volume.numpy(), kernels, edges)
        assert ours.dtype == dtype and ours.shape == volume.shape
        scale = float(np.abs(expected).max())
        tolerance = 1e-14 if dtype == torch.float64 else 2e-6
        assert float(np.abs(ours.numpy() - expected).max()) <= tolerance * scale
        # the matrix products, the fallback, give the same numbers to rounding
        matrices = [axis_filter_matrix(n, k, edges=edges, dtype=dtype) if k is not None else None
                    for n, k in zip(shape[1:], kernels, strict=True)]
        fallback = filter_axes(volume, matrices, dimensions=dimensions)
        assert float((ours - fallback).abs().max()) <= tolerance * scale


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("edges", ["replicate", "zeros"])
@pytest.mark.parametrize("shape", [(3, 21, 18, 40), (2, 7, 1, 5), (1, 3, 70, 2), (5, 30, 41, 37), (2, 1, 1, 1)])
def test_three_axes_in_one_call_give_the_calls_per_axis_numbers_bit_for_bit(monkeypatch, generator, dtype,
                                                                             edges, shape):
    pyramid.filter_kernels()
    whole = pyramid._volume_filter_kernels[dtype]
    calls = []
    monkeypatch.setitem(pyramid._volume_filter_kernels, dtype, lambda *arguments: calls.append(1) or whole(*arguments))
    # these volumes and the wide Gaussian take the calls per axis by default
    monkeypatch.setattr(pyramid, "_WHOLE_VOLUME_MINIMUM", 0)
    monkeypatch.setattr(pyramid, "_WHOLE_VOLUME_RADIUS", 100)
    volume = (torch.rand(*shape, dtype=torch.float64, generator=generator) * 10.0 - 3.0).to(dtype)
    # a Gaussian wider than some axes (radius 9), a box, and kernels that differ by axis
    for kernels in ([gaussian_kernel(3.0, dtype=torch.float64, device="cpu").tolist()] * 3,
                    [[1.0] * 9] * 3,
                    [[0.5, -1.0, 2.0], [1.0], [1.0, 0.25, 3.0, -0.5, 0.125]]):
        calls.clear()
        ours = separable_filter(volume, kernels, edges=edges, dimensions=3)
        assert calls == [1], "all three axes given: the one-call filter runs"
        by_axis = volume
        for axis, kernel in enumerate(kernels):
            alone = [None] * 3
            alone[axis] = kernel
            by_axis = separable_filter(by_axis, alone, edges=edges, dimensions=3)
        assert calls == [1], "one axis at a time: the per-axis filter runs"
        assert ours.dtype == dtype and torch.equal(ours, by_axis)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_narrow_kernels_on_large_volumes_take_one_call_and_the_rest_a_call_per_axis(monkeypatch, generator,
                                                                                   dtype):
    pyramid.filter_kernels()
    whole = pyramid._volume_filter_kernels[dtype]
    calls = []
    monkeypatch.setitem(pyramid._volume_filter_kernels, dtype, lambda *arguments: calls.append(1) or whole(*arguments))
    box, gaussian = [1.0] * 9, gaussian_kernel(3.0, dtype=torch.float64, device="cpu").tolist()
    # CC's box (radius 4) on a coarse SyN grid (3 x 16 x 19 x 15 values) and on 3 x 32 x 38 x 31 >= 2^16
    # values; SyN's sigma-3 smoothing (radius 9) on the latter, and on 3 x 64 x 48 x 60 >= 2^19 values,
    # where float64 takes the one call
    wide = [1] if dtype == torch.float64 else []
    for shape, kernel, expected_calls in (((3, 16, 19, 15), box, []), ((3, 32, 38, 31), box, [1]),
                                          ((3, 32, 38, 31), gaussian, []), ((3, 64, 48, 60), gaussian, wide)):
        calls.clear()
        volume = torch.rand(*shape, dtype=torch.float64, generator=generator).to(dtype)
        ours = separable_filter(volume, [kernel] * 3, edges="zeros", dimensions=3)
        assert calls == expected_calls
        by_axis = volume
        for axis in range(3):
            alone = [None] * 3
            alone[axis] = kernel
            by_axis = separable_filter(by_axis, alone, edges="zeros", dimensions=3)
        assert torch.equal(ours, by_axis)


@needs_compiler
def test_box_sum_counts_every_voxel_of_the_box_exactly():
    ones = torch.ones(2, 12, 9, 10, dtype=torch.float32)
    counts = box_sum(ones, radius=4, dimensions=3)
    along = [torch.tensor([min(i + 4, n - 1) - max(i - 4, 0) + 1 for i in range(n)], dtype=torch.float32)
             for n in (12, 9, 10)]
    expected = along[0][:, None, None] * along[1][None, :, None] * along[2][None, None, :]
    assert torch.equal(counts[0], expected) and torch.equal(counts[1], expected)
    assert float(counts.max()) == 9 * 9 * 9 and float(counts.min()) == 5 * 5 * 5


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_c_filter_gives_the_same_numbers_on_one_thread_and_two(generator, dtype):
    # large enough (3 x 40 x 41 x 39 values) that the loops are split over OpenMP's threads
    volume = torch.rand(3, 40, 41, 39, dtype=torch.float64, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = smooth(volume, 2.0, dimensions=3)
        torch.set_num_threads(2)
        split = smooth(volume, 2.0, dimensions=3)
        # each thread pads and filters its own share of the edge rows: scipy's numbers too, for a
        # wide Gaussian (edge rows 18 of 40) and a zero-padded box
        wide = smooth(volume, 3.0, dimensions=3)
        boxed = box_sum(volume, radius=4, dimensions=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, split)
    tolerance = 1e-14 if dtype == torch.float64 else 2e-6
    for ours, kernel, edges in ((wide, gaussian_kernel(3.0, dtype=torch.float64, device="cpu").tolist(), "replicate"),
                                (boxed, [1.0] * 9, "zeros")):
        expected = scipy_filter(volume.numpy(), [kernel] * 3, edges)
        assert float(np.abs(ours.numpy() - expected).max()) <= tolerance * float(np.abs(expected).max())


@needs_compiler
def test_the_matrix_products_run_where_the_c_filter_would_differ(generator):
    volume = torch.rand(2, 6, 7, 5, dtype=torch.float64, generator=generator)
    assert pyramid._native_filter(volume) is not None
    # autograd tracks the volume: the matrix products, which it can differentiate
    tracked = volume.clone().requires_grad_(True)
    assert pyramid._native_filter(tracked) is None
    smoothed = smooth(tracked, 1.0, dimensions=3)
    (gradient,) = torch.autograd.grad(smoothed.sum(), tracked)
    assert gradient.shape == volume.shape and float(gradient.abs().sum()) > 0
    assert torch.allclose(smoothed.detach(), smooth(volume, 1.0, dimensions=3), atol=1e-14)
    # an emulated format rounds every torch operation, which a C loop would bypass
    with VirtualPrecision("bf16"):
        assert pyramid._native_filter(volume) is None
        rounded = smooth(volume, 1.0, dimensions=3)
    assert not torch.equal(rounded, smooth(volume, 1.0, dimensions=3))
    assert pyramid._native_filter(volume.to(torch.float16)) is None


def test_without_the_c_filter_the_matrix_products_give_the_numbers(monkeypatch, generator):
    volume = torch.rand(3, 9, 8, 11, dtype=torch.float64, generator=generator)
    kernels = [gaussian_kernel(1.5, dtype=torch.float64, device="cpu").tolist()] * 3
    monkeypatch.setattr(pyramid, "_filter_kernels", {})
    ours = separable_filter(volume, kernels, edges="replicate", dimensions=3)
    expected = scipy_filter(volume.numpy(), kernels, "replicate")
    assert float(np.abs(ours.numpy() - expected).max()) <= 1e-14


def test_filter_arguments_are_checked():
    volume = torch.zeros(4, 5, 6)
    with pytest.raises(ValueError, match=r"edges: unknown mode 'wrap'"):
        separable_filter(volume, [[1.0]] * 3, edges="wrap", dimensions=3)
    with pytest.raises(ValueError, match=r"kernels: 2 given for 3 axes"):
        separable_filter(volume, [[1.0]] * 2, edges="zeros", dimensions=3)
    with pytest.raises(ValueError, match=r"kernels: a centred kernel has an odd number of taps, not 2"):
        separable_filter(volume, [[1.0, 1.0], None, None], edges="zeros", dimensions=3)
    assert separable_filter(volume, [None] * 3, edges="zeros", dimensions=3) is volume


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(9, 12, 10), (40, 41, 43)])  # one thread; split over threads
def test_fused_correlation_passes_give_the_torch_operations_numbers(monkeypatch, dtype, shape):
    from dynomp.registration import metrics

    if native.compiler() is None or not native.enabled():
        pytest.skip("no C compiler on this machine, or DYNOMP_NATIVE=0")
    generator = torch.Generator().manual_seed(sum(shape))
    fixed = pyramid.smooth(torch.rand(*shape, dtype=torch.float64, generator=generator), 1.0, dimensions=3)
    moving = 0.5 * fixed + 0.5 * pyramid.smooth(torch.rand(*shape, dtype=torch.float64, generator=generator), 1.0,
                                                dimensions=3)
    # a flat corner: zero variance there (the epsilon and the clamps at work)
    fixed[:3, :3, :3] = 0.25
    fixed, moving = fixed.to(dtype), moving.to(dtype)
    results = []
    for kernels in (None, {}):  # None: load the C passes; {}: none, so the torch operations run
        monkeypatch.setattr(metrics, "_correlation_kernels", kernels)
        a, b = fixed.clone().requires_grad_(True), moving.clone().requires_grad_(True)
        loss = metrics.local_cross_correlation(a, b, radius=4)
        results.append((loss.detach(), *torch.autograd.grad(3.0 * loss, [a, b])))
    (loss, grad_fixed, grad_moving), (expected, expected_fixed, expected_moving) = results
    monkeypatch.setattr(metrics, "_correlation_kernels", None)
    assert metrics.correlation_kernels(), "a C compiler is here, so the fused passes must load"
    assert loss.dtype == dtype and 0.2 < float(loss) <= 1.0
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    assert abs(float(loss) - float(expected)) <= tolerance * float(expected)
    for ours, theirs in ((grad_fixed, expected_fixed), (grad_moving, expected_moving)):
        assert float(theirs.abs().max()) > 0
        assert float((ours - theirs).abs().max()) <= tolerance * float(theirs.abs().max())
    # one gradient only, where only one image is differentiated
    b = moving.clone().requires_grad_(True)
    (only,) = torch.autograd.grad(3.0 * metrics.local_cross_correlation(fixed, b, radius=4), [b])
    assert torch.equal(only, grad_moving)
    # a NaN voxel turns the loss NaN (the engine then records a divergence)
    broken = moving.clone()
    broken[4, 5, 6] = float("nan")
    assert torch.isnan(metrics.local_cross_correlation(fixed, broken, radius=4))
