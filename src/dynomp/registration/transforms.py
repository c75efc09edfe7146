"""Transforms: centre of mass, rigid and affine maps, displacement fields and their algebra.

Coordinates. The engine works on the fixed image's voxel grid, with physical positions given by
voxel-to-world affines (RAS+, as nibabel). Rigid and affine transforms act on physical points,
y = M (x - c) + c + t, with c the fixed image's centre of mass, so a rotation is a rotation in mm
whatever the voxel sizes. Displacement fields live on a grid of the fixed image and are stored in
that grid's voxel units, shape (D, *grid); a field u stands for the map x -> x + u(x).

Resampling is torch's `grid_sample` (trilinear or nearest), so the same code runs on CPU and CUDA,
except for one case: trilinear sampling of a 3-D volume with border padding on the CPU, which every
iteration does, runs a compiled kernel (`dynomp.registration.interpolation`) that gives the same
values 2-3x faster and computes in the volume's own format.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynomp.precision.dispatch import (
    narrow,
    single_precision_accumulation,
    widen,
    widened_call,
    widened_dtype,
)
from dynomp.registration.interpolation import (
    displaced_sample,
    displaced_sample_with_gradient,
    inversion_kernel,
    inversion_step,
    trilinear_sample,
)


def identity_coordinates(
    shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str = "cpu", cached: bool = False
) -> torch.Tensor:
    """Voxel indices of every voxel of a grid, shape (D, *shape).

    `cached`: the grid is built once per shape, dtype and device and shared, for the callers that ask
    for the same one at every iteration of a level (`warp`); do not modify it in place. The cache
    holds the two most recent grids only, so a finished level's grids (or a float64 grid, once the
    arm computes in float32) do not stay in memory.
    """
    key = (tuple(int(n) for n in shape), dtype, torch.device(device))
    return _cached_identity_coordinates(*key) if cached else _identity_coordinates(*key)


@functools.lru_cache(maxsize=2)
def _cached_identity_coordinates(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # unrounded whatever format is emulated when it is first asked for (bf16 holds indices to 256)
    with single_precision_accumulation():
        return _identity_coordinates(shape, dtype, device)


def _identity_coordinates(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    axes = [torch.arange(n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def sample(
    volume: torch.Tensor,
    coordinates: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding: str = "border",
    wide_points: bool = False,
) -> torch.Tensor:
    """Values of `volume` (*grid, or C x *grid) at voxel `coordinates` (D, *out), interpolated.

    `out` is a grid of D axes or any other shape (e.g. one axis: a list of points).
    `wide_points`: the coordinates are held in at least fp32 by design, not in the step's format
    (x + u(x) in `warp`, dynomp's map from master parameters). Natively their dtype says so; an
    emulated 16-bit run holds every tensor in float32, and is told here to leave their gradient
    unrounded.
    """
    dimensions = coordinates.shape[0]
    spatial = volume.shape[-dimensions:]
    channels = volume.shape[:-dimensions]
    if _compiled_kernel_applies(volume, coordinates, mode=mode, padding=padding):
        values = trilinear_sample(volume.reshape(-1, *spatial),
                                  coordinates.reshape(dimensions, -1).to(volume.dtype))
        return values.reshape(*channels, *coordinates.shape[1:])
    # a natively 16-bit volume is read at fp32 points in fp32 (grid_sample takes one dtype), both
    # ways, and its values given back in the volume's dtype
    values = widened_call(functools.partial(_grid_sample, dimensions=dimensions, mode=mode, padding=padding),
                          volume, coordinates, rounded=(True, not wide_points))
    return narrow(values, volume.dtype).reshape(*channels, *coordinates.shape[1:])


def _grid_sample(volume: torch.Tensor, coordinates: torch.Tensor, *, dimensions: int, mode: str,
                 padding: str) -> torch.Tensor:
    """`sample` by grid_sample, on a volume of at least fp32 (the points in its dtype)."""
    spatial = volume.shape[-dimensions:]
    # grid_sample wants (..., D) in [-1, 1] with the last array axis first: one scaled copy. The
    # points are held in at least fp32 whatever the format (as a GPU's texture unit computes its
    # addresses): in bf16, [-1, 1] steps by 1/256 of an axis, half a voxel on a 128-voxel axis
    scales = [2.0 / (n - 1) if n > 1 else 0.0 for n in spatial[::-1]]
    scale = torch.tensor(scales, dtype=volume.dtype, device=coordinates.device)
    grid = torch.addcmul(
        torch.tensor(-1.0, dtype=volume.dtype, device=coordinates.device),
        coordinates.flip(0).movedim(0, -1).to(volume.dtype),
        scale,
    )
    if coordinates.dim() - 1 != dimensions:
        # a list of points rather than a grid: grid_sample wants D output axes, so add unit ones
        grid = grid.reshape(-1, *([1] * (dimensions - 1)), dimensions)
    batch = volume.reshape(1, -1, *spatial)
    return F.grid_sample(batch, grid.unsqueeze(0), mode=mode, padding_mode=padding, align_corners=True)


def _compiled_kernel_applies(volume: torch.Tensor, coordinates: torch.Tensor, *, mode: str,
                             padding: str) -> bool:
    """True where `trilinear_sample` gives what grid_sample would, and no emulated format is active.

    An emulated format (`VirtualPrecision`, a dispatch mode) rounds the result of every torch op; the
    compiled kernel is not a torch op, so grid_sample runs there.
    """
    return (
        coordinates.shape[0] == 3 and mode == "bilinear" and padding == "border"
        and volume.device.type == "cpu" and coordinates.device.type == "cpu"
        and volume.dtype in (torch.float32, torch.float64) and not volume.requires_grad
        and _get_current_dispatch_mode() is None
    )


def to_physical(coordinates: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates (D, *grid) to physical points (D, *grid) through a homogeneous affine."""
    dimensions = coordinates.shape[0]
    affine = affine.to(device=coordinates.device, dtype=coordinates.dtype)
    flat = coordinates.reshape(dimensions, -1)
    points = affine[:dimensions, :dimensions] @ flat + affine[:dimensions, dimensions, None]
    return points.reshape(coordinates.shape)


def to_voxels(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Physical points (D, *grid) to voxel coordinates of the grid whose affine is `affine`."""
    inverse = torch.linalg.inv(affine.to(torch.float64))
    return to_physical(points, inverse)


def center_of_mass(volume: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre in physical coordinates (negative intensities count as zero)."""
    weights = volume.detach().to(torch.float64).clamp(min=0)
    total = weights.sum()
    dimensions = volume.dim()
    if not total > 0:
        raise ValueError("centre of mass: the image has no positive intensity")
    # each axis's mean index from the weights' marginal along it: no (D, *shape) coordinate grid
    voxel_center = torch.stack([
        weights.sum(dim=[other for other in range(dimensions) if other != axis])
        @ torch.arange(size, dtype=torch.float64, device=volume.device)
        for axis, size in enumerate(volume.shape)
    ]) / total
    return to_physical(voxel_center.reshape(dimensions, 1), affine.to(volume.device)).reshape(-1)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation from Euler angles in radians: one angle in 2-D, three (about x, y, z) in 3-D."""
    if angles.numel() == 1:
        cos, sin = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])])
    if angles.numel() != 3:
        raise ValueError(f"angles: expected 1 (2-D) or 3 (3-D) angles, got {angles.numel()}")
    one, zero = torch.ones_like(angles[0]), torch.zeros_like(angles[0])
    cx, sx = torch.cos(angles[0]), torch.sin(angles[0])
    cy, sy = torch.cos(angles[1]), torch.sin(angles[1])
    cz, sz = torch.cos(angles[2]), torch.sin(angles[2])
    about_x = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, cx, -sx]),
                           torch.stack([zero, sx, cx])])
    about_y = torch.stack([torch.stack([cy, zero, sy]), torch.stack([zero, one, zero]),
                           torch.stack([-sy, zero, cy])])
    about_z = torch.stack([torch.stack([cz, -sz, zero]), torch.stack([sz, cz, zero]),
                           torch.stack([zero, zero, one])])
    return about_z @ about_y @ about_x


def rotation_angles(matrix: torch.Tensor) -> torch.Tensor:
    """Euler angles of a rotation matrix, the inverse of `rotation_matrix` (away from gimbal lock)."""
    if matrix.shape[0] == 2:
        return torch.atan2(matrix[1, 0], matrix[0, 0]).reshape(1)
    angle_y = torch.asin((-matrix[2, 0]).clamp(-1.0, 1.0))
    angle_x = torch.atan2(matrix[2, 1], matrix[2, 2])
    angle_z = torch.atan2(matrix[1, 0], matrix[0, 0])
    return torch.stack([angle_x, angle_y, angle_z])


def homogeneous(matrix: torch.Tensor, translation: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """The (D+1)x(D+1) matrix of y = M (x - c) + c + t."""
    dimensions = matrix.shape[0]
    result = torch.eye(dimensions + 1, dtype=matrix.dtype, device=matrix.device)
    result[:dimensions, :dimensions] = matrix
    result[:dimensions, dimensions] = center - matrix @ center + translation
    return result


def affine_coordinates(
    transform: torch.Tensor,
    *,
    fixed_affine: torch.Tensor,
    moving_affine: torch.Tensor,
    shape: Sequence[int],
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """Moving-grid voxel coordinates of every fixed-grid voxel x: M^-1 T F (x + u(x)).

    `transform` is the homogeneous physical map T (fixed point -> moving point); F and M are the
    two grids' voxel-to-world affines; `displacement` u is an optional field on the fixed grid.
    """
    coordinates = identity_coordinates(shape, dtype=transform.dtype, device=transform.device)
    if displacement is not None:
        coordinates = coordinates + displacement.to(transform.dtype)
    return map_points(transform, fixed_affine=fixed_affine, moving_affine=moving_affine, points=coordinates)


def voxel_map(transform: torch.Tensor, *, fixed_affine: torch.Tensor, moving_affine: torch.Tensor,
              moving_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """The homogeneous map M^-1 T F from fixed-grid voxels to moving-grid voxels, in T's dtype.

    `moving_inverse`: M^-1 in float64, for a caller that maps points at every iteration.
    """
    dtype, device = transform.dtype, transform.device
    if moving_inverse is None:
        moving_inverse = torch.linalg.inv(moving_affine.to(device=device, dtype=torch.float64))
    return moving_inverse.to(device=device, dtype=dtype) @ transform @ fixed_affine.to(device=device, dtype=dtype)


def map_points(
    transform: torch.Tensor, *, fixed_affine: torch.Tensor, moving_affine: torch.Tensor, points: torch.Tensor,
    moving_inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Moving-grid voxel coordinates M^-1 T F x of fixed-grid voxel coordinates x (D, ...).

    `moving_inverse`: M^-1 in float64, for a caller that maps points at every iteration.
    """
    dimensions = points.shape[0]
    combined = voxel_map(transform, fixed_affine=fixed_affine, moving_affine=moving_affine,
                         moving_inverse=moving_inverse)
    flat = points.reshape(dimensions, -1).to(transform.dtype)
    mapped = torch.addmm(combined[:dimensions, dimensions, None], combined[:dimensions, :dimensions], flat)
    return mapped.reshape(points.shape)


def warp(
    volume: torch.Tensor, displacement: torch.Tensor, *, mode: str = "bilinear", padding: str = "border"
) -> torch.Tensor:
    """`volume` resampled at x + u(x) (both on the same grid)."""
    if (displacement.shape[0] == 3 and displacement.dim() == 4
            and _compiled_kernel_applies(volume, displacement, mode=mode, padding=padding)):
        spatial = volume.shape[-3:]
        values = displaced_sample(volume.reshape(-1, *spatial), displacement.to(volume.dtype))
        return values.reshape(*volume.shape[:-3], *displacement.shape[1:])
    # x + u(x) in at least fp32, and read there in fp32 (see `sample`): a small 16-bit displacement
    # is precise, but added to a bf16 voxel index of 77 it would move in half-voxel steps
    values = widened_call(functools.partial(_displaced_grid_sample, mode=mode, padding=padding),
                          volume, displacement)
    return narrow(values, volume.dtype)


def _displaced_grid_sample(volume: torch.Tensor, displacement: torch.Tensor, *, mode: str,
                           padding: str) -> torch.Tensor:
    """`warp` by grid_sample, on tensors of at least fp32."""
    coordinates = identity_coordinates(displacement.shape[1:], dtype=displacement.dtype,
                                       device=displacement.device, cached=True)
    return sample(volume, coordinates + displacement.to(coordinates.dtype), mode=mode, padding=padding,
                  wide_points=True)


def warp_with_gradient(
    volume: torch.Tensor, displacement: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]] | None:
    """`warp(volume, displacement)` by the compiled sampler, and a function taking a gradient with
    respect to the warped values to the gradient with respect to `displacement`, without autograd.

    None where `warp` would not run the compiled kernel (see `_compiled_kernel_applies`), or where
    the two tensors' dtypes differ.
    """
    if not (displacement.dim() == 4 and displacement.shape[0] == 3 and displacement.dtype == volume.dtype
            and _compiled_kernel_applies(volume, displacement, mode="bilinear", padding="border")):
        return None
    spatial = volume.shape[-3:]
    values, backward = displaced_sample_with_gradient(volume.reshape(-1, *spatial), displacement)

    def gradient(grad_values: torch.Tensor) -> torch.Tensor:
        return backward(grad_values.reshape(values.shape))

    return values.reshape(*volume.shape[:-3], *displacement.shape[1:]), gradient


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The field of (x -> x + outer) after (x -> x + inner): inner(x) + outer(x + inner(x))."""
    return inner + warp(outer, inner)


INVERSION_METHODS = ("newton", "damped")
# Newton steps are taken where det(I + Du) at x + v(x) is above this (sampler.c's
# INVERSION_NEWTON_DETERMINANT): elsewhere the map folds or squeezes a voxel to a tenth of its volume
NEWTON_DETERMINANT = 0.1


def invert(
    displacement: torch.Tensor,
    *,
    iterations: int = 30,
    initial: torch.Tensor | None = None,
    tolerance: float = 0.0,
    damping: float = 0.5,
    method: str = "newton",
) -> torch.Tensor:
    """The inverse field v with u(x + v(x)) = -v(x): v(x) + u(x + v(x)) = 0 at every voxel x.

    With r = v(x) + u(x + v(x)), the residual:

    - `method="newton"` (the default): each iteration solves (I + J) s = -r, J the Jacobian of u at
      x + v(x) (I + J is the Jacobian of the map y -> y + u(y) there), and moves v by s: a few
      iterations reach 1e-4 voxels where the damped iteration ends near 5e-4 after 30 (on the
      benchmark pair, docs/benchmarks.md). Where det(I + J) is below `NEWTON_DETERMINANT` (the map
      folds, or squeezes a voxel to a tenth of its volume) that voxel takes the damped step.
    - `method="damped"`: each iteration moves v a fraction `damping` of the way to -u(x + v(x)).
      The plain iteration (damping 1) converges only where u's Jacobian has its eigenvalues in
      (-1, 1), that is where the map x + u(x) neither folds nor stretches by 2x or more; with damping
      a it converges where they lie in (-1, 2/a - 1): for 0.5, wherever the map keeps its
      orientation and stretches by less than 4x, but slowly where it squeezes (the error shrinks
      by (1 - a (1 + lambda)) a step, 0.75 where an eigenvalue lambda is -0.5).

    `initial` (a previous inverse) speeds it up. It stops early once no voxel's |r| is above
    `tolerance` voxels (0: run every iteration).

    On the CPU in float32/float64 (3-D, no emulated format active) each iteration is one compiled
    pass (`interpolation.inversion_step`, J the trilinear interpolant's own partials) into a second
    buffer, the two swapped when the step is taken; elsewhere torch operations run (warp, then the
    step's arithmetic; J from forward differences of u, `_interpolant_partials`): the same numbers
    to rounding.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"method: unknown inversion method {method!r} (known: {', '.join(INVERSION_METHODS)})")
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping: {damping} is outside (0, 1]")
    newton = method == "newton"
    inverse = -displacement if initial is None else initial
    field = displacement.contiguous()
    if (iterations > 0 and _get_current_dispatch_mode() is None and inversion_kernel(field) is not None
            and not displacement.requires_grad and not inverse.requires_grad):
        # the compiled steps write into their own buffers: `initial` is left as it is
        inverse = inverse.to(field.dtype).contiguous().clone()
        spare = torch.empty_like(inverse)
        for _ in range(iterations):
            change = inversion_step(field, inverse, spare, damping, newton=newton)
            if tolerance > 0 and change <= tolerance:
                break
            inverse, spare = spare, inverse
        return inverse
    differences = _forward_differences(displacement) if newton and iterations > 0 else None
    for _ in range(iterations):
        residual = warp(displacement, inverse) + inverse
        change = float(residual.abs().max()) if tolerance > 0 else math.inf
        if change <= tolerance:
            break
        if newton:
            inverse = inverse + _newton_step(residual, _interpolant_partials(differences, inverse), damping)
        else:
            inverse = inverse - damping * residual
    return inverse


def _forward_differences(displacement: torch.Tensor) -> list[torch.Tensor | None]:
    """u(i + 1) - u(i) along each axis of a (3, D, H, W) field, with a last copy that keeps the
    grid's shape (a cell's lower corner is at most n - 2); None along a one-voxel axis."""
    differences = []
    for axis, length in enumerate(displacement.shape[1:]):
        if length == 1:
            differences.append(None)
            continue
        difference = displacement.diff(dim=axis + 1)
        differences.append(torch.cat([difference, difference.narrow(axis + 1, length - 2, 1)], dim=axis + 1))
    return differences


def _interpolant_partials(differences: list[torch.Tensor | None], inverse: torch.Tensor) -> torch.Tensor:
    """The partials of u's trilinear interpolant at x + v(x), as the compiled step takes them:
    (9, D, H, W), channel 3 r + c the derivative of component r along axis c; `differences` is
    `_forward_differences(u)`.

    Along axis c the interpolant is linear within a cell, so its derivative is the forward
    difference u(i + 1) - u(i) at the cell's lower corner i, interpolated along the other two axes:
    the difference field sampled at the point with its axis-c coordinate moved down to i. Zero
    along an axis where the point lies outside the grid (border padding holds u constant there)."""
    shape = tuple(inverse.shape[1:])
    with single_precision_accumulation():
        points = identity_coordinates(shape, dtype=widened_dtype(inverse.dtype), device=inverse.device,
                                      cached=True) + widen(inverse)
    columns = []
    for axis, (length, difference) in enumerate(zip(shape, differences, strict=True)):
        if difference is None:
            columns.append(torch.zeros_like(inverse))
            continue
        coordinate = points[axis]
        at = points.clone()
        at[axis] = coordinate.clamp(0, length - 1).floor().clamp(max=length - 2)
        inside = (coordinate > 0) & (coordinate < length - 1)
        columns.append(sample(difference, at) * inside.to(difference.dtype))
    return torch.stack(columns, dim=1).reshape(9, *shape)


def _newton_step(residual: torch.Tensor, partials: torch.Tensor, damping: float) -> torch.Tensor:
    """s with (I + J) s = -r at each voxel, J from `partials` (9, ...); -damping r where
    det(I + J) is not above NEWTON_DETERMINANT (or not a number)."""
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = partials.unbind(0)
    m00, m11, m22 = m00 + 1, m11 + 1, m22 + 1
    c00, c01, c02 = m11 * m22 - m12 * m21, m12 * m20 - m10 * m22, m10 * m21 - m11 * m20
    determinant = m00 * c00 + m01 * c01 + m02 * c02
    rz, ry, rx = residual.unbind(0)
    scale = -1.0 / determinant
    step = torch.stack([
        scale * (c00 * rz + (m02 * m21 - m01 * m22) * ry + (m01 * m12 - m02 * m11) * rx),
        scale * (c01 * rz + (m00 * m22 - m02 * m20) * ry + (m02 * m10 - m00 * m12) * rx),
        scale * (c02 * rz + (m01 * m20 - m00 * m21) * ry + (m00 * m11 - m01 * m10) * rx),
    ])
    return torch.where(determinant > NEWTON_DETERMINANT, step, -damping * residual)


def resize_field(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A field moved to a grid with `shape` voxels over the same extent, in the new voxel units."""
    dimensions = displacement.shape[0]
    old = displacement.shape[1:]
    if tuple(old) == tuple(shape):
        return displacement
    mode = "trilinear" if dimensions == 3 else "bilinear"
    resized = F.interpolate(displacement.unsqueeze(0), size=tuple(shape), mode=mode, align_corners=True)[0]
    scales = [((new - 1) / (previous - 1)) if previous > 1 else 1.0 for previous, new in zip(old, shape, strict=True)]
    factors = torch.tensor(scales, dtype=resized.dtype, device=resized.device)
    return resized * factors.reshape(dimensions, *([1] * dimensions))
