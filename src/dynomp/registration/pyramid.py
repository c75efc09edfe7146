"""The image pyramid: Gaussian smoothing in voxel units, then shrinking by an integer factor.

As in ANTs (`--smoothing-sigmas 3x2x1x0vox --shrink-factors 8x4x2x1`), each level smooths the
full-resolution image with a sigma given in its voxels and resamples it onto a grid with about
1/factor as many voxels along each axis. The coarse grid spans the same field of view (its first
and last voxel centres coincide with the full grid's), and its voxel-to-world affine says where it
lies, so every later step can work in physical coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynomp.registration.transforms import identity_coordinates, sample


def gaussian_kernel(sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of standard deviation `sigma` voxels, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (positions / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def smooth(volume: torch.Tensor, sigma: float | Sequence[float], *, dimensions: int) -> torch.Tensor:
    """Separable Gaussian smoothing of the last `dimensions` axes (replicated edges); sigma in voxels.

    Leading axes (channels, e.g. the components of a displacement field) are smoothed one by one.
    """
    sigmas = [float(sigma)] * dimensions if isinstance(sigma, int | float) else [float(s) for s in sigma]
    if all(s <= 0 for s in sigmas):
        return volume
    spatial = volume.shape[-dimensions:]
    batch = volume.reshape(-1, 1, *spatial)
    convolution = F.conv3d if dimensions == 3 else F.conv2d
    for axis, axis_sigma in enumerate(sigmas):
        if axis_sigma <= 0:
            continue
        kernel = gaussian_kernel(axis_sigma, dtype=volume.dtype, device=volume.device)
        radius = kernel.numel() // 2
        shape = [1] * dimensions
        shape[axis] = kernel.numel()
        padding = [0, 0] * dimensions
        # F.pad lists the last axis first
        padding[2 * (dimensions - 1 - axis)] = radius
        padding[2 * (dimensions - 1 - axis) + 1] = radius
        batch = F.pad(batch, padding, mode="replicate")
        batch = convolution(batch, kernel.reshape(1, 1, *shape))
    return batch.reshape(volume.shape)


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
