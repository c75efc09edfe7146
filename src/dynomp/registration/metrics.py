"""Similarity metrics, written as losses to minimise: Mattes mutual information, local CC, MSE.

All three are plain differentiable torch expressions, so autograd gives the gradient with respect
to transform parameters or displacement fields, in whatever dtype the images are held in.

- Mattes MI (Mattes et al. 2003, ANTs' `MI[...,32]`): a joint histogram of 32 x 32 bins built by
  Parzen windowing with a cubic B-spline kernel on both images, over a regular subsample of the
  voxels (`sampling_fraction`, ANTs' `Regular,0.25`). Loss = -MI.
- Local cross-correlation (ANTs' `CC[...,radius]`): squared correlation over a (2r+1)^D box around
  every voxel, with the box sums from separable convolutions (cumulative sums would lose every bit
  of a 16-bit format on a 100-voxel line). Loss = -mean CC.
- Mean squared error of intensities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Parzen bins kept free at each end so the B-spline support of extreme values stays in range
_PADDING_BINS = 2


def cubic_bspline(distance: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel (support |t| < 2, integral 1)."""
    t = distance.abs()
    inner = (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0
    outer = (2.0 - t).clamp(min=0.0) ** 3 / 6.0
    return torch.where(t < 1.0, inner, outer)


def parzen_weights(values: torch.Tensor, *, low: float, high: float, bins: int) -> torch.Tensor:
    """N x bins B-spline weights of `values` mapped linearly from [low, high] onto the bins."""
    span = high - low if high > low else 1.0
    usable = bins - 1 - 2 * _PADDING_BINS
    position = (values - low) * (usable / span) + _PADDING_BINS
    position = position.clamp(_PADDING_BINS, bins - 1 - _PADDING_BINS)
    centers = torch.arange(bins, dtype=values.dtype, device=values.device)
    return cubic_bspline(position.unsqueeze(-1) - centers)


def mutual_information(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    bins: int = 32,
    fixed_range: tuple[float, float],
    moving_range: tuple[float, float],
) -> torch.Tensor:
    """Mattes mutual information (nats) of two equally long intensity vectors."""
    fixed_weights = parzen_weights(fixed.reshape(-1), low=fixed_range[0], high=fixed_range[1], bins=bins)
    moving_weights = parzen_weights(
        moving.reshape(-1), low=moving_range[0], high=moving_range[1], bins=bins
    )
    joint = fixed_weights.transpose(0, 1) @ moving_weights
    joint = joint / joint.sum()
    fixed_marginal = joint.sum(1, keepdim=True)
    moving_marginal = joint.sum(0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny
    ratio = joint / (fixed_marginal * moving_marginal).clamp(min=tiny)
    return (joint * torch.log(ratio.clamp(min=tiny))).sum()


def box_sum(volume: torch.Tensor, *, radius: int) -> torch.Tensor:
    """Sum over the (2r+1)^D box around every voxel (zero outside), by separable convolutions."""
    dimensions = volume.dim()
    batch = volume.reshape(1, 1, *volume.shape)
    convolution = F.conv3d if dimensions == 3 else F.conv2d
    for axis in range(dimensions):
        shape = [1] * dimensions
        shape[axis] = 2 * radius + 1
        padding = [0] * dimensions
        padding[axis] = radius
        kernel = torch.ones(1, 1, *shape, dtype=volume.dtype, device=volume.device)
        batch = convolution(batch, kernel, padding=tuple(padding))
    return batch.reshape(volume.shape)


def local_cross_correlation(fixed: torch.Tensor, moving: torch.Tensor, *, radius: int = 4) -> torch.Tensor:
    """Mean over voxels of the squared local correlation in a (2r+1)^D box (ANTs' CC metric)."""
    count = box_sum(torch.ones_like(fixed), radius=radius)
    sum_fixed = box_sum(fixed, radius=radius)
    sum_moving = box_sum(moving, radius=radius)
    cross = box_sum(fixed * moving, radius=radius) - sum_fixed * sum_moving / count
    fixed_variance = box_sum(fixed * fixed, radius=radius) - sum_fixed**2 / count
    moving_variance = box_sum(moving * moving, radius=radius) - sum_moving**2 / count
    # the epsilon keeps flat background (zero variance) from dividing 0 by 0
    epsilon = 1e-5 * count
    correlation = cross * cross / (fixed_variance * moving_variance + epsilon)
    return correlation.mean()


def mean_squared_error(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Mean of the squared intensity differences."""
    return ((fixed - moving) ** 2).mean()


def regular_sample_index(count: int, *, fraction: float, seed: int, device: torch.device) -> torch.Tensor | None:
    """Every k-th voxel (k = round(1/fraction)) from a seeded offset; None when all voxels are used."""
    stride = max(1, round(1.0 / fraction))
    if stride == 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, stride, (1,), generator=generator))
    return torch.arange(offset, count, stride, device=device)


def build_loss(
    name: str,
    *,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int = 32,
    radius: int = 4,
    sampling_fraction: float = 1.0,
    seed: int = 0,
) -> Loss:
    """The loss `name` (mi, cc or mse) for a level, with MI's ranges and sample taken from its images."""
    if name == "mi":
        fixed_range = (float(fixed.min()), float(fixed.max()))
        moving_range = (float(moving.min()), float(moving.max()))
        index = regular_sample_index(
            fixed.numel(), fraction=sampling_fraction, seed=seed, device=fixed.device
        )

        def mi_loss(fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
            fixed_flat, moving_flat = fixed_values.reshape(-1), moving_values.reshape(-1)
            if index is not None:
                fixed_flat, moving_flat = fixed_flat[index], moving_flat[index]
            return -mutual_information(
                fixed_flat, moving_flat, bins=bins, fixed_range=fixed_range, moving_range=moving_range
            )

        return mi_loss
    if name == "cc":
        return lambda fixed_values, moving_values: -local_cross_correlation(
            fixed_values, moving_values, radius=radius
        )
    if name == "mse":
        return mean_squared_error
    raise ValueError(f"metric: unknown metric {name!r} (known: mi, cc, mse)")
