"""Jacobian determinant of a displacement field: folding (% of determinants <= 0) and SDlogJ."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def jacobian_determinant(displacement: np.ndarray, *, spacing: Sequence[float]) -> np.ndarray:
    """det(I + grad u) per voxel of a field (*grid, D) in mm on a grid with `spacing` mm voxels."""
    displacement = np.asarray(displacement, dtype=np.float64)
    dimensions = displacement.shape[-1]
    if displacement.ndim != dimensions + 1:
        raise ValueError(f"displacement: expected shape (*grid, {dimensions}), got {displacement.shape}")
    if len(spacing) != dimensions:
        raise ValueError(f"spacing: expected {dimensions} values, got {len(spacing)}")
    jacobian = np.empty(displacement.shape[:-1] + (dimensions, dimensions))
    for component in range(dimensions):
        gradients = np.gradient(displacement[..., component], *spacing)
        for axis in range(dimensions):
            jacobian[..., component, axis] = gradients[axis] + (1.0 if component == axis else 0.0)
    return np.linalg.det(jacobian)


def folding_percent(determinant: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Percentage of voxels (inside `mask`, if given) whose Jacobian determinant is <= 0."""
    values = determinant if mask is None else determinant[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("mask: selects no voxels")
    return float(100.0 * np.mean(values <= 0))


def sd_log_jacobian(determinant: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of log(det J) over voxels with det J > 0 (inside `mask`, if given)."""
    values = determinant if mask is None else determinant[np.asarray(mask, dtype=bool)]
    positive = values[values > 0]
    if positive.size == 0:
        return float("nan")
    return float(np.std(np.log(positive)))
