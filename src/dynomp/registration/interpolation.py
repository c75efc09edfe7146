"""A compiled trilinear sampler for 3-D volumes on the CPU (border padding), with its gradient.

torch's CPU `grid_sample` has a vectorised kernel for 2-D images only; its 3-D kernel is a scalar
loop whose float32 run is no faster than its float64 run. It took about 45 % of a registration's
time, and that share did not shrink with the format. This module is the same interpolation,
compiled, with the arithmetic in the volume's own dtype (float32 stays float32):

- C kernels (`sampler.c`), compiled on first use for the host by `dynomp.native`: the compiler
  vectorises their loops with gather loads (16 float32 or 8 float64 points per AVX-512
  instruction), so that float32 takes about 0.6x of float64's time, and they split their loops over
  torch's own OpenMP threads;
- numba kernels (below), where no C compiler is found or `DYNOMP_NATIVE=0`: the same numbers to
  rounding, scalar loops (as slow in float32 as in float64), split with `dynomp.threads.run_split`.

- `trilinear_sample(volume, coordinates)`: values of a (C, D, H, W) volume at voxel coordinates
  (3, N).
- `displaced_sample(volume, displacement)`: values at x + u(x) for every voxel x of a field's grid,
  without building those coordinates (`transforms.warp`, every SyN iteration).

Both are autograd functions: on the way back, the gradient with respect to the coordinates or the
displacement (the registration never differentiates with respect to the image). Coordinates
outside the grid are clamped to it, which is `grid_sample`'s `padding_mode="border"` with
`align_corners=True`: values at the nearest border point, zero gradient along a clamped axis.

Timings are in docs/benchmarks.md. The numba kernels are compiled on first use and cached on disk
(numba's `cache=True`), so a later process loads them in a fraction of a second.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numba import njit

from dynomp import native
from dynomp.threads import run_split


@njit(cache=True, nogil=True, boundscheck=False)
def _cell(z, y, x, limits, steps):  # pragma: no cover - compiled
    """The cell of point (z, y, x), border-clamped: its lower corner's flat index, its fractions."""
    real = limits.dtype.type  # every constant in the volume's dtype: float32 stays float32
    zero = real(0)
    z = min(max(z, zero), limits[0])
    y = min(max(y, zero), limits[1])
    x = min(max(x, zero), limits[2])
    # the lower corner; on the last voxel the cell below it (weight 1 on its upper corner)
    i = min(int(z), steps[3])
    j = min(int(y), steps[4])
    k = min(int(x), steps[5])
    return i * steps[0] + j * steps[1] + k * steps[2], z - real(i), y - real(j), x - real(k)


@njit(cache=True, nogil=True, boundscheck=False)
def _value(v, p, fz, fy, fx, steps):  # pragma: no cover - compiled
    """Trilinear value of the 1-D volume view v in the cell at p."""
    sz, sy, sx = steps[0], steps[1], steps[2]
    a = v[p] + fx * (v[p + sx] - v[p])
    b = v[p + sy] + fx * (v[p + sy + sx] - v[p + sy])
    e = v[p + sz] + fx * (v[p + sz + sx] - v[p + sz])
    f = v[p + sz + sy] + fx * (v[p + sz + sy + sx] - v[p + sz + sy])
    g = a + fy * (b - a)
    return g + fz * (e + fy * (f - e) - g)


@njit(cache=True, nogil=True, boundscheck=False)
def _partials(v, p, fz, fy, fx, steps):  # pragma: no cover - compiled
    """The trilinear value's derivatives along z, y and x in the cell at p."""
    sz, sy, sx = steps[0], steps[1], steps[2]
    v000, v001 = v[p], v[p + sx]
    v010, v011 = v[p + sy], v[p + sy + sx]
    v100, v101 = v[p + sz], v[p + sz + sx]
    v110, v111 = v[p + sz + sy], v[p + sz + sy + sx]
    a = v000 + fx * (v001 - v000)
    b = v010 + fx * (v011 - v010)
    e = v100 + fx * (v101 - v100)
    f = v110 + fx * (v111 - v110)
    low = (v001 - v000) + fy * ((v011 - v010) - (v001 - v000))
    high = (v101 - v100) + fy * ((v111 - v110) - (v101 - v100))
    return (e + fy * (f - e)) - (a + fy * (b - a)), (b - a) + fz * ((f - e) - (b - a)), low + fz * (high - low)


@njit(cache=True, nogil=True, boundscheck=False)
def _forward(volume, coordinates, limits, steps, out, start, stop):  # pragma: no cover - compiled
    """Values at the points start..stop of `coordinates` (3, N)."""
    if volume.shape[0] == 3:  # a displacement field: one cell lookup for its three components
        v0, v1, v2, o0, o1, o2 = volume[0], volume[1], volume[2], out[0], out[1], out[2]
        for n in range(start, stop):
            p, fz, fy, fx = _cell(coordinates[0, n], coordinates[1, n], coordinates[2, n], limits, steps)
            o0[n] = _value(v0, p, fz, fy, fx, steps)
            o1[n] = _value(v1, p, fz, fy, fx, steps)
            o2[n] = _value(v2, p, fz, fy, fx, steps)
        return
    # one channel at a time, over 1-D views: indexing the 2-D array inside the loop took 1.6x longer
    for c in range(volume.shape[0]):
        v, o = volume[c], out[c]
        for n in range(start, stop):
            p, fz, fy, fx = _cell(coordinates[0, n], coordinates[1, n], coordinates[2, n], limits, steps)
            o[n] = _value(v, p, fz, fy, fx, steps)


@njit(cache=True, nogil=True, boundscheck=False)
def _backward(volume, coordinates, limits, steps, grad_out, grad_coordinates, start, stop):  # pragma: no cover
    """Gradient with respect to the points start..stop of `coordinates`."""
    zero = limits.dtype.type(0)
    for n in range(start, stop):
        grad_coordinates[0, n] = grad_coordinates[1, n] = grad_coordinates[2, n] = zero
    for c in range(volume.shape[0]):
        v, weights = volume[c], grad_out[c]
        for n in range(start, stop):
            z, y, x = coordinates[0, n], coordinates[1, n], coordinates[2, n]
            p, fz, fy, fx = _cell(z, y, x, limits, steps)
            dz, dy, dx = _partials(v, p, fz, fy, fx, steps)
            weight = weights[n]
            # a coordinate clamped to the border does not move the value
            if zero < z < limits[0]:
                grad_coordinates[0, n] += weight * dz
            if zero < y < limits[1]:
                grad_coordinates[1, n] += weight * dy
            if zero < x < limits[2]:
                grad_coordinates[2, n] += weight * dx


@njit(cache=True, nogil=True, boundscheck=False)
def _forward_displaced(volume, displacement, limits, steps, grid, out, start, stop):  # pragma: no cover
    """Values at x + u(x) for the grid rows start..stop (a row: one (i, j), all k; grid: its H, W)."""
    real = limits.dtype.type
    if volume.shape[0] == 3:  # a displacement field (compose): one cell lookup for its components
        v0, v1, v2, o0, o1, o2 = volume[0], volume[1], volume[2], out[0], out[1], out[2]
        for row in range(start, stop):
            i, j = real(row // grid[0]), real(row % grid[0])
            for k in range(grid[1]):
                n = row * grid[1] + k
                p, fz, fy, fx = _cell(i + displacement[0, n], j + displacement[1, n],
                                      real(k) + displacement[2, n], limits, steps)
                o0[n] = _value(v0, p, fz, fy, fx, steps)
                o1[n] = _value(v1, p, fz, fy, fx, steps)
                o2[n] = _value(v2, p, fz, fy, fx, steps)
        return
    for c in range(volume.shape[0]):
        v, o = volume[c], out[c]
        for row in range(start, stop):
            i, j = real(row // grid[0]), real(row % grid[0])
            for k in range(grid[1]):
                n = row * grid[1] + k
                p, fz, fy, fx = _cell(i + displacement[0, n], j + displacement[1, n], real(k) + displacement[2, n],
                                      limits, steps)
                o[n] = _value(v, p, fz, fy, fx, steps)


@njit(cache=True, nogil=True, boundscheck=False)
def _backward_displaced(volume, displacement, limits, steps, grid, grad_out, grad_displacement, start,
                        stop):  # pragma: no cover - compiled
    """Gradient with respect to u for the grid rows start..stop."""
    real = limits.dtype.type
    zero = real(0)
    for n in range(start * grid[1], stop * grid[1]):
        grad_displacement[0, n] = grad_displacement[1, n] = grad_displacement[2, n] = zero
    for c in range(volume.shape[0]):
        v, weights = volume[c], grad_out[c]
        for row in range(start, stop):
            i, j = real(row // grid[0]), real(row % grid[0])
            for k in range(grid[1]):
                n = row * grid[1] + k
                z, y, x = i + displacement[0, n], j + displacement[1, n], real(k) + displacement[2, n]
                p, fz, fy, fx = _cell(z, y, x, limits, steps)
                dz, dy, dx = _partials(v, p, fz, fy, fx, steps)
                weight = weights[n]
                if zero < z < limits[0]:
                    grad_displacement[0, n] += weight * dz
                if zero < y < limits[1]:
                    grad_displacement[1, n] += weight * dy
                if zero < x < limits[2]:
                    grad_displacement[2, n] += weight * dx


NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_REAL = object()  # stands for the kernel's own float type (c_float or c_double) in a signature
_REALS = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_SIGNATURES = {  # the C kernels' arguments (sampler.c), the start and stop of the split last
    "sample_points": [_POINTER, *[_SIZE] * 4, _POINTER, _SIZE, _POINTER, _SIZE, _SIZE],
    "sample_points_backward": [_POINTER, *[_SIZE] * 4, _POINTER, _SIZE, _POINTER, _POINTER, _SIZE, _SIZE],
    "sample_displaced": [_POINTER, *[_SIZE] * 4, _POINTER, *[_SIZE] * 3, _POINTER, _SIZE, _SIZE],
    "sample_displaced_backward": [_POINTER, *[_SIZE] * 4, _POINTER, *[_SIZE] * 3, _POINTER, _POINTER, _SIZE, _SIZE],
    # Mattes MI under a linear map (parzen.LinearInformation): no split, it returns the MI
    "linear_mattes": [_POINTER, *[_SIZE] * 3, _POINTER, _POINTER, _SIZE, _POINTER, _POINTER, _SIZE, _POINTER, _POINTER],
    # the same from a rigid or affine parameter vector, with the chain rule back to it
    "linear_parameters": [_POINTER, *[_SIZE] * 3, _POINTER, _POINTER, _SIZE, _POINTER, ctypes.c_int, _POINTER,
                          _POINTER, _SIZE, _POINTER, _POINTER],
    # one step of transforms.invert (Newton or damped): no split, it returns the largest residual
    "inversion_step": [_POINTER, *[_SIZE] * 3, _POINTER, _REAL, _POINTER, ctypes.c_int],
    # SyN's step, fused (`update_norm`, `compose_scaled`): no split
    "update_norm": [_POINTER, _SIZE],
    "compose_scaled": [_POINTER, *[_SIZE] * 3, _POINTER, _REAL, _POINTER],
}
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
_RESULTS = {"linear_mattes": _REALS, "linear_parameters": _REALS, "inversion_step": _REALS, "update_norm": _REALS}
_native_kernels: dict[tuple[str, torch.dtype], Any] | None = None
_native_threads = False  # True where the C kernels split their loops over OpenMP threads themselves
# flat voxel indices in the C kernels are 32-bit
_NATIVE_CHANNEL_LIMIT = 2**31 - 1


def native_kernels() -> dict[tuple[str, torch.dtype], Any]:
    """The C kernels by (name, dtype), compiled for this machine on first use (`dynomp.native`);
    empty where no C compiler is available or `DYNOMP_NATIVE=0`: the numba kernels run then."""
    global _native_kernels, _native_threads
    if _native_kernels is None:
        library = native.library("registration/sampler")
        _native_kernels = {}
        if library is not None:
            _native_threads = bool(library.sampler_threads())
            _native_kernels = kernel_table(library)
    return _native_kernels


def kernel_table(library: ctypes.CDLL) -> dict[tuple[str, torch.dtype], Any]:
    """A compiled sampler library's kernels by (name, dtype), their arguments and results declared."""
    table = {}
    for name, arguments in _SIGNATURES.items():
        for dtype, suffix in _SUFFIXES.items():
            kernel = getattr(library, f"{name}_{suffix}")
            kernel.argtypes = [_REALS[dtype] if a is _REAL else a for a in arguments]
            kernel.restype = _RESULTS.get(name, {}).get(dtype)
            table[name, dtype] = kernel
    return table


def _run_native(kernel: Any, *arguments: object, points: int, samples_per_point: int = 1) -> None:
    """A C kernel over 0..points: one call where it splits its loops itself, else `run_split`."""
    if _native_threads:
        kernel(*arguments, 0, points)
    else:
        run_split(kernel, *arguments, points=points, samples_per_point=samples_per_point)


def _native(name: str, volume: torch.Tensor) -> Any:
    """The C kernel `name` for this volume's dtype, or None (no compiler, or too large a channel)."""
    if volume[0].numel() > _NATIVE_CHANNEL_LIMIT:
        return None
    return native_kernels().get((name, volume.dtype))


def _geometry(volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The largest coordinate per axis (in the volume's dtype); the flat steps to a cell's upper
    corners and the largest lower corner per axis (integers). An axis of one voxel steps by 0."""
    sizes = volume.shape[1:]
    strides = (sizes[1] * sizes[2], sizes[2], 1)
    limits = np.asarray([n - 1 for n in sizes], dtype=NUMPY_DTYPES[volume.dtype])
    steps = np.asarray([s if n > 1 else 0 for s, n in zip(strides, sizes, strict=True)]
                       + [max(n - 2, 0) for n in sizes], dtype=np.int64)
    return limits, steps


class _TrilinearSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
        volume = volume.detach().contiguous()
        coordinates = coordinates.detach().contiguous()
        out = torch.empty(volume.shape[0], coordinates.shape[1], dtype=volume.dtype)
        kernel = _native("sample_points", volume)
        if kernel is not None:
            _run_native(kernel, volume.data_ptr(), *volume.shape, coordinates.data_ptr(), coordinates.shape[1],
                      out.data_ptr(), points=coordinates.shape[1])
        else:
            run_split(_forward, volume.reshape(volume.shape[0], -1).numpy(), coordinates.numpy(),
                      *_geometry(volume), out.numpy(), points=coordinates.shape[1])
        ctx.save_for_backward(volume, coordinates)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor]:
        volume, coordinates = ctx.saved_tensors
        grad_coordinates = torch.empty_like(coordinates)
        grad_out = grad_out.detach().contiguous()
        kernel = _native("sample_points_backward", volume)
        if kernel is not None:
            _run_native(kernel, volume.data_ptr(), *volume.shape, coordinates.data_ptr(), coordinates.shape[1],
                      grad_out.data_ptr(), grad_coordinates.data_ptr(), points=coordinates.shape[1])
        else:
            run_split(_backward, volume.reshape(volume.shape[0], -1).numpy(), coordinates.numpy(),
                      *_geometry(volume), grad_out.numpy(), grad_coordinates.numpy(), points=coordinates.shape[1])
        return None, grad_coordinates


def _displaced_values(volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """`displaced_sample`'s values, outside autograd (contiguous tensors of one dtype)."""
    grid = np.asarray(displacement.shape[2:], dtype=np.int64)
    flat = displacement.reshape(3, -1)
    out = torch.empty(volume.shape[0], flat.shape[1], dtype=volume.dtype)
    rows = displacement.shape[1] * displacement.shape[2]
    kernel = _native("sample_displaced", volume)
    if kernel is not None:
        _run_native(kernel, volume.data_ptr(), *volume.shape, displacement.data_ptr(), *displacement.shape[2:],
                    flat.shape[1], out.data_ptr(), points=rows, samples_per_point=displacement.shape[3])
    else:
        run_split(_forward_displaced, volume.reshape(volume.shape[0], -1).numpy(), flat.numpy(),
                  *_geometry(volume), grid, out.numpy(), points=rows, samples_per_point=displacement.shape[3])
    return out.reshape(volume.shape[0], *displacement.shape[1:])


def _displaced_gradient(volume: torch.Tensor, displacement: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of <grad_out, displaced values> with respect to the displacement (contiguous
    tensors of one dtype)."""
    grid = np.asarray(displacement.shape[2:], dtype=np.int64)
    gradient = torch.empty_like(displacement)
    rows = displacement.shape[1] * displacement.shape[2]
    kernel = _native("sample_displaced_backward", volume)
    if kernel is not None:
        _run_native(kernel, volume.data_ptr(), *volume.shape, displacement.data_ptr(), *displacement.shape[2:],
                    displacement[0].numel(), grad_out.data_ptr(), gradient.data_ptr(), points=rows,
                    samples_per_point=displacement.shape[3])
    else:
        run_split(_backward_displaced, volume.reshape(volume.shape[0], -1).numpy(),
                  displacement.reshape(3, -1).numpy(), *_geometry(volume), grid,
                  grad_out.reshape(volume.shape[0], -1).numpy(), gradient.reshape(3, -1).numpy(), points=rows,
                  samples_per_point=displacement.shape[3])
    return gradient


class _DisplacedSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        volume = volume.detach().contiguous()
        displacement = displacement.detach().contiguous()
        ctx.save_for_backward(volume, displacement)
        return _displaced_values(volume, displacement)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor]:
        volume, displacement = ctx.saved_tensors
        return None, _displaced_gradient(volume, displacement, grad_out.detach().contiguous())


def _check(volume: torch.Tensor, points: torch.Tensor, name: str, points_dims: int) -> None:
    if volume.dim() != 4 or points.dim() != points_dims or points.shape[0] != 3:
        expected = "(3, N)" if points_dims == 2 else "(3, D, H, W)"
        raise ValueError(f"{name}: expected (C, D, H, W) and {expected}, got {tuple(volume.shape)} "
                         f"and {tuple(points.shape)}")
    if volume.dtype != points.dtype or volume.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: both tensors must share float32 or float64, got {volume.dtype} "
                         f"and {points.dtype}")
    if volume.device.type != "cpu" or points.device.type != "cpu":
        raise ValueError(f"{name}: CPU tensors only (CUDA uses grid_sample)")


def displaced_sample(volume: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Values of `volume` (C, D, H, W) at x + u(x) for every voxel x of u's grid (3, D', H', W').

    `trilinear_sample` at identity + u without building those coordinates: a (C, D', H', W')
    tensor, differentiable with respect to `displacement` only.
    """
    _check(volume, displacement, "displaced_sample", 4)
    return _DisplacedSample.apply(volume, displacement)


def displaced_sample_with_gradient(
    volume: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """`displaced_sample`'s values, and a function that takes the gradient with respect to them to
    the gradient with respect to `displacement`: the same two kernel calls, without autograd (for
    a caller that writes its whole chain rule out, like SyN's compiled evaluation)."""
    _check(volume, displacement, "displaced_sample", 4)
    volume = volume.detach().contiguous()
    displacement = displacement.detach().contiguous()

    def gradient(grad_out: torch.Tensor) -> torch.Tensor:
        return _displaced_gradient(volume, displacement, grad_out.detach().contiguous())

    return _displaced_values(volume, displacement), gradient


def trilinear_sample(volume: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """Values of `volume` (C, D, H, W) at voxel `coordinates` (3, N): a (C, N) tensor.

    CPU float32/float64 tensors of one dtype; differentiable with respect to `coordinates` only.
    """
    _check(volume, coordinates, "trilinear_sample", 2)
    return _TrilinearSample.apply(volume, coordinates)


def inversion_step(displacement: torch.Tensor, inverse: torch.Tensor, out: torch.Tensor,
                   damping: float, *, newton: bool = False) -> float:
    """One step of `transforms.invert` in one compiled pass, from v = `inverse` to `out`, for
    u = `displacement` (both (3, D, H, W) on u's grid), with r = v(x) + u(x + v(x)): the damped
    fixed-point step `out` = v - damping r, or with `newton` the Newton step `out` = v + s,
    (I + Du(x + v)) s = -r, where that Jacobian's determinant is above 0.1 (the damped step
    elsewhere). Returns max |r| (NaN where any r is NaN). `out` must not overlap `inverse`.

    CPU float32/float64, contiguous tensors of one dtype and shape, with the C sampler compiled
    (`inversion_kernel`); the caller runs the torch operations elsewhere.
    """
    kernel = inversion_kernel(displacement, inverse, out)
    if kernel is None:
        raise ValueError("inversion_step: needs contiguous CPU float32/float64 (3, D, H, W) fields of one "
                         f"dtype and shape and a C compiler, got {tuple(displacement.shape)} "
                         f"{displacement.dtype} and {tuple(inverse.shape)} {inverse.dtype}")
    return float(kernel(displacement.data_ptr(), *displacement.shape[1:], inverse.data_ptr(), damping,
                        out.data_ptr(), int(newton)))


def inversion_kernel(*fields: torch.Tensor) -> Any:
    """The compiled inversion step for these fields, or None where it does not apply."""
    first = fields[0]
    if not (first.dim() == 4 and first.shape[0] == 3 and first[0].numel() <= _NATIVE_CHANNEL_LIMIT):
        return None
    if not all(f.shape == first.shape and f.dtype == first.dtype and f.device.type == "cpu"
               and f.is_contiguous() for f in fields):
        return None
    return native_kernels().get(("inversion_step", first.dtype))


def update_kernels(*fields: torch.Tensor) -> bool:
    """True where `update_norm` and `compose_scaled` run for these (3, D, H, W) fields: contiguous
    CPU float32/float64 tensors of one shape and dtype, the C sampler compiled."""
    return inversion_kernel(*fields) is not None and ("update_norm", fields[0].dtype) in native_kernels()


def update_norm(direction: torch.Tensor) -> float:
    """The largest dz^2 + dy^2 + dx^2 over the voxels of a (3, D, H, W) field, computed in its dtype
    (NaN where any voxel's is NaN): `(direction * direction).sum(0).max()` in one pass, no temporaries."""
    if not update_kernels(direction):
        raise ValueError(f"update_norm: needs a contiguous CPU float32/float64 (3, D, H, W) field and a C "
                         f"compiler, got {tuple(direction.shape)} {direction.dtype}")
    kernel = native_kernels()["update_norm", direction.dtype]
    return float(kernel(direction.data_ptr(), direction[0].numel()))


def compose_scaled(field: torch.Tensor, direction: torch.Tensor, scale: float) -> torch.Tensor:
    """s d(x) + u(x + s d(x)) with u = `field`, d = `direction`, s = `scale` (exact in their dtype):
    `transforms.compose(u, s * d)` in one pass, the same values bit for bit."""
    if not update_kernels(field, direction):
        raise ValueError(f"compose_scaled: needs contiguous CPU float32/float64 (3, D, H, W) fields of one "
                         f"dtype and shape and a C compiler, got {tuple(field.shape)} {field.dtype} and "
                         f"{tuple(direction.shape)} {direction.dtype}")
    out = torch.empty_like(field)
    native_kernels()["compose_scaled", field.dtype](field.data_ptr(), *field.shape[1:], direction.data_ptr(),
                                                    scale, out.data_ptr())
    return out


def load_kernels() -> None:
    """Compile or load the kernels for float32 and float64 now rather than on first use (the
    sampler's, MI's, the controller's statistics and the separable filter's).

    Loading takes about half a second and 70 MB (numba's compiler runtime) in a fresh process;
    a benchmark calls this before it measures its baseline, as it imports the rest of the code.
    """
    native_kernels()
    for dtype in (torch.float32, torch.float64):
        volume = torch.zeros(1, 2, 2, 2, dtype=dtype)
        coordinates = torch.full((3, 1), 0.5, dtype=dtype, requires_grad=True)
        trilinear_sample(volume, coordinates).sum().backward()
        displacement = torch.zeros(3, 2, 2, 2, dtype=dtype, requires_grad=True)
        displaced_sample(volume, displacement).sum().backward()
    from dynomp.precision.estimator import load_kernels as load_statistics_kernels
    from dynomp.registration.parzen import load_kernels as load_parzen_kernels
    from dynomp.registration.pyramid import filter_kernels

    load_parzen_kernels()
    load_statistics_kernels()
    filter_kernels()
