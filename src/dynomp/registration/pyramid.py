"""The image pyramid: Gaussian smoothing in voxel units, then shrinking by an integer factor.

As in ANTs (`--smoothing-sigmas 3x2x1x0vox --shrink-factors 8x4x2x1`), each level smooths the
full-resolution image with a sigma given in its voxels and resamples it onto a grid with about
1/factor as many voxels along each axis. The coarse grid spans the same field of view (its first
and last voxel centres coincide with the full grid's), and its voxel-to-world affine says where it
lies, so every later step can work in physical coordinates.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynomp import native
from dynomp.precision.dispatch import narrow, single_precision_accumulation
from dynomp.registration.transforms import identity_coordinates, sample


def gaussian_kernel(sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of standard deviation `sigma` voxels, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


# The caches below build their constants unrounded (`single_precision_accumulation` suspends an
# emulated format): one built during an emulated step would otherwise keep that format's rounding
# for every later caller, fp64 runs included. The step's format applies where they are used.
@functools.lru_cache(maxsize=64)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    with single_precision_accumulation():
        return tuple(gaussian_kernel(sigma, dtype=torch.float64, device=torch.device("cpu")).tolist())


@functools.lru_cache(maxsize=64)
def _axis_matrix(length: int, taps: tuple[float, ...], replicate: bool, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    with single_precision_accumulation():
        return _built_axis_matrix(length, taps, replicate, dtype, device)


def _built_axis_matrix(length: int, taps: tuple[float, ...], replicate: bool, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    kernel = torch.tensor(taps, dtype=torch.float64)
    radius = len(taps) // 2
    rows = torch.arange(length).unsqueeze(1).expand(length, len(taps))
    columns = rows + torch.arange(-radius, radius + 1)
    weights = kernel.expand(length, len(taps))
    if replicate:
        columns = columns.clamp(0, length - 1)
    else:
        inside = (columns >= 0) & (columns < length)
        rows, columns, weights = rows[inside], columns[inside], weights[inside]
    matrix = torch.zeros(length, length, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), columns.reshape(-1)), weights.reshape(-1), accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def axis_filter_matrix(length: int, kernel: Sequence[float], *, edges: str, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """The length x length matrix of a centred 1-D filter along an axis (edges: replicate or zeros).

    Row i holds the kernel's weights at columns i - r .. i + r; with replicated edges the weights
    that fall outside are added to the first or last column, which is what padding by replication
    and then convolving does. The matrix is shared (cached): do not modify it. Under an emulated
    format it comes rounded to the format (a copy), as a natively 16-bit matrix holds its weights.
    """
    if edges not in ("replicate", "zeros"):
        raise ValueError(f"edges: unknown mode {edges!r} (known: replicate, zeros)")
    taps = tuple(float(value) for value in kernel)
    return narrow(_axis_matrix(int(length), taps, edges == "replicate", dtype, torch.device(device)), dtype)


def filter_axes(volume: torch.Tensor, matrices: Sequence[torch.Tensor | None], *, dimensions: int) -> torch.Tensor:
    """Apply one matrix along each of the last `dimensions` axes (None: leave that axis alone).

    A separable filter as matrix products rather than `conv3d`: torch has no fast float64
    convolution on CPU, and a Gaussian of sigma 1.7 over a 3 x 65 x 77 x 63 field took 730 ms there
    with `conv3d`, 10 ms as three matrix products (BLAS), with the same result to 1 ulp.
    """
    spatial = tuple(volume.shape[-dimensions:])
    result = volume.reshape(-1, *spatial)
    for axis, matrix in enumerate(matrices):
        if matrix is None:
            continue
        length = spatial[axis]
        before = result.shape[0] * math.prod(spatial[:axis])
        after = math.prod(spatial[axis + 1 :])
        if after == 1:
            result = (result.reshape(-1, length) @ matrix.transpose(0, 1)).reshape(-1, *spatial)
        else:
            result = (matrix @ result.reshape(before, length, after)).reshape(-1, *spatial)
    return result.reshape(volume.shape)


_FILTER_ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
_VOLUME_FILTER_ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 4,
                            *[ctypes.c_void_p, ctypes.c_int64] * 3, ctypes.c_int32]
_filter_kernels: dict[torch.dtype, Any] | None = None
# the three axes of 3-D volumes in one call (`filter_volume`), by dtype, loaded with the above
_volume_filter_kernels: dict[torch.dtype, Any] = {}


def filter_kernels() -> dict[torch.dtype, Any]:
    """The C filter (`filters.c`) by dtype, compiled for this machine on first use (`dynomp.native`);
    empty where no C compiler is available or `DYNOMP_NATIVE=0`: the matrix products run then."""
    global _filter_kernels
    if _filter_kernels is None:
        library = native.library("registration/filters", fallback="BLAS matrix products")
        _filter_kernels = {}
        if library is not None:
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                kernel = getattr(library, f"filter_axis_{suffix}")
                kernel.argtypes, kernel.restype = _FILTER_ARGUMENTS, None
                _filter_kernels[dtype] = kernel
                whole = getattr(library, f"filter_volume_{suffix}")
                whole.argtypes, whole.restype = _VOLUME_FILTER_ARGUMENTS, ctypes.c_int
                _volume_filter_kernels[dtype] = whole
    return _filter_kernels


def _native_filter(volume: torch.Tensor) -> Any:
    """The C filter for `volume`, or None where the matrix products must run: another device or
    dtype, a volume autograd differentiates, or an emulated format (a dispatch mode rounds every
    torch operation, which a C loop would bypass)."""
    if (volume.device.type != "cpu" or (volume.requires_grad and torch.is_grad_enabled())
            or _get_current_dispatch_mode() is not None):
        return None
    return filter_kernels().get(volume.dtype)


@functools.lru_cache(maxsize=32)
def _taps_tensor(taps: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """A kernel's taps as a CPU tensor the C filter reads (built once per kernel and dtype)."""
    return torch.tensor(taps, dtype=dtype)


def _taps_key(kernel: Sequence[float]) -> tuple[float, ...]:
    """A kernel as the tuple `_taps_tensor` is cached by: a tuple is taken as it is (the smoothing
    and box kernels are cached tuples), anything else converted (19 conversions and a hash of the
    result cost more than a coarse level's filter itself)."""
    return kernel if isinstance(kernel, tuple) else tuple(float(value) for value in kernel)


# The one-call filter (`filter_volume`, plane by plane) against a call per axis, interleaved and
# under `reused_heap` (docs/benchmarks.md): the one call is the faster for kernels of radius up to 6
# from 3 x 32 x 38 x 31 values up (CC's box sums, radius 4, at 5 x 32 x 38 x 31 values: 313 against
# 367 us in float64, 196 against 226 us in float32), and the slower for SyN's sigma-3 smoothing
# (radius 9) and for any kernel on SyN's two coarsest grids (a tap list per plane costs more than
# the two intermediates it saves there) - but for the sigma-3 smoothing of a float64 field of
# 2^19 values or more (the benchmark pair's full 3 x 65 x 77 x 63): in SyN's step there the calls
# per axis took 15.1 ms against the one call's 14.2 ms in float64, and 7.8 against 8.1 ms in float32
_WHOLE_VOLUME_MINIMUM = 1 << 16
_WHOLE_VOLUME_RADIUS = 6
_WIDE_FLOAT64_MINIMUM = 1 << 19


def one_call_filter(values: int, radius: int, dtype: torch.dtype) -> bool:
    """Whether `separable_filter` filters the three axes of a volume of `values` values (channels x
    voxels) of `dtype` in one call, for kernels of largest radius `radius`, rather than in a call
    per axis: whichever was the faster where it was measured (above)."""
    if values < _WHOLE_VOLUME_MINIMUM:
        return False
    return radius <= _WHOLE_VOLUME_RADIUS or (dtype == torch.float64 and values >= _WIDE_FLOAT64_MINIMUM)


def separable_filter(volume: torch.Tensor, kernels: Sequence[Sequence[float] | None], *, edges: str,
                     dimensions: int) -> torch.Tensor:
    """Filter the last `dimensions` axes with one centred 1-D kernel each (None: leave that axis).

    edges: "replicate" (the edge voxel repeats outward) or "zeros". On the CPU in float32 or
    float64 the C loops of `filters.c` run, a multiply-add per tap in the volume's dtype; elsewhere
    (CUDA, emulated formats, tensors autograd tracks, no C compiler) the axis matrices of
    `axis_filter_matrix` do, through `filter_axes`. The two agree to rounding.
    """
    if edges not in ("replicate", "zeros"):
        raise ValueError(f"edges: unknown mode {edges!r} (known: replicate, zeros)")
    if len(kernels) != dimensions:
        raise ValueError(f"kernels: {len(kernels)} given for {dimensions} axes")
    for kernel in kernels:
        if kernel is not None and len(kernel) % 2 != 1:
            raise ValueError(f"kernels: a centred kernel has an odd number of taps, not {len(kernel)}")
    if all(kernel is None for kernel in kernels):
        return volume
    spatial = tuple(volume.shape[-dimensions:])
    function = _native_filter(volume)
    if function is None:
        matrices = [
            axis_filter_matrix(length, kernel, edges=edges, dtype=volume.dtype, device=volume.device)
            if kernel is not None else None
            for length, kernel in zip(spatial, kernels, strict=True)
        ]
        return filter_axes(volume, matrices, dimensions=dimensions)
    result = volume.detach().contiguous()
    batch = result.numel() // max(1, math.prod(spatial))
    replicate = int(edges == "replicate")
    every_axis = all(kernel is not None for kernel in kernels)
    whole = (_volume_filter_kernels.get(volume.dtype)
             if dimensions == 3 and every_axis
             and one_call_filter(result.numel(), max(len(kernel) // 2 for kernel in kernels), volume.dtype)
             else None)
    if whole is not None:
        # all three axes plane by plane in one call: the same numbers as the calls per axis below
        taps = [_taps_tensor(_taps_key(kernel), volume.dtype) for kernel in kernels]
        axes = [argument for tensor, kernel in zip(taps, kernels, strict=True)
                for argument in (tensor.data_ptr(), len(kernel) // 2)]
        out = torch.empty_like(result)
        if whole(result.data_ptr(), out.data_ptr(), batch, *spatial, *axes, replicate) == 0:
            return out
    for axis, kernel in enumerate(kernels):
        if kernel is None:
            continue
        taps = _taps_tensor(_taps_key(kernel), volume.dtype)
        out = torch.empty_like(result)
        function(result.data_ptr(), out.data_ptr(), batch * math.prod(spatial[:axis]), spatial[axis],
                 math.prod(spatial[axis + 1:]), taps.data_ptr(), len(kernel) // 2, replicate)
        result = out
    return result


def smooth(volume: torch.Tensor, sigma: float | Sequence[float], *, dimensions: int) -> torch.Tensor:
    """Separable Gaussian smoothing of the last `dimensions` axes (replicated edges); sigma in voxels.

    Leading axes (channels, e.g. the components of a displacement field) are smoothed one by one.
    """
    sigmas = [float(sigma)] * dimensions if isinstance(sigma, int | float) else [float(s) for s in sigma]
    if all(s <= 0 for s in sigmas):
        return volume
    kernels = [_gaussian_taps(axis_sigma) if axis_sigma > 0 else None for axis_sigma in sigmas]
    return separable_filter(volume, kernels, edges="replicate", dimensions=dimensions)


@dataclass(frozen=True)
class PyramidLevel:
    """One level of an image pyramid: the resampled voxels and their voxel-to-world affine."""

    data: torch.Tensor
    affine: torch.Tensor


def shrunk_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """ITK's shrink: floor(n / factor) voxels per axis, at least one."""
    return tuple(max(1, int(n) // int(factor)) for n in shape)


def level_scale(shape: Sequence[int], new_shape: Sequence[int]) -> torch.Tensor:
    """Homogeneous matrix from a coarse grid's voxel indices to the full grid's (same end centres)."""
    dimensions = len(shape)
    scale = torch.eye(dimensions + 1, dtype=torch.float64)
    for axis, (old, new) in enumerate(zip(shape, new_shape, strict=True)):
        if new > 1:
            scale[axis, axis] = (old - 1) / (new - 1)
        else:
            scale[axis, dimensions] = (old - 1) / 2.0
    return scale


def build_level(
    volume: torch.Tensor, affine: torch.Tensor, *, shrink_factor: int, sigma: float
) -> PyramidLevel:
    """Smooth `volume` by `sigma` voxels and shrink it by `shrink_factor` (a level of the pyramid)."""
    dimensions = volume.dim()
    affine = affine.to(torch.float64)
    smoothed = smooth(volume, sigma, dimensions=dimensions)
    shape = tuple(volume.shape)
    new_shape = shrunk_shape(shape, shrink_factor)
    if new_shape == shape:
        return PyramidLevel(smoothed, affine)
    scale = level_scale(shape, new_shape)
    coordinates = identity_coordinates(new_shape, dtype=torch.float64, device=volume.device)
    flat = coordinates.reshape(dimensions, -1)
    linear = scale[:dimensions, :dimensions].to(volume.device)
    offset = scale[:dimensions, dimensions].to(volume.device)
    fine = (linear @ flat + offset[:, None]).reshape(dimensions, *new_shape)
    return PyramidLevel(sample(smoothed, fine.to(volume.dtype)), affine @ scale)
