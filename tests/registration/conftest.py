"""Synthetic pairs: a textured ellipsoidal 'brain' with two labelled structures, and known transforms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import affine_transform, gaussian_filter, map_coordinates

SIZE = 32
SPACING = 2.0


def phantom(size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipsoid with two inner structures; returns (image, labels)."""
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=float)] * 3, indexing="ij"))
    center = (size - 1) / 2
    offset = grid - center
    scale = size / 32
    outer = np.sqrt((offset[0] / (11 * scale)) ** 2 + (offset[1] / (8 * scale)) ** 2
                    + (offset[2] / (9 * scale)) ** 2) < 1
    first = np.sqrt(((offset[0] - 4 * scale) / (4 * scale)) ** 2 + ((offset[1] + 2 * scale) / (3 * scale)) ** 2
                    + (offset[2] / (3 * scale)) ** 2) < 1
    second = np.sqrt(((offset[0] + 4 * scale) / (3 * scale)) ** 2 + ((offset[1] - 2 * scale) / (3 * scale)) ** 2
                     + ((offset[2] - 2 * scale) / (4 * scale)) ** 2) < 1
    texture = gaussian_filter(np.random.default_rng(seed).normal(size=grid.shape[1:]), 2.0)
    texture = texture / np.abs(texture).max()
    image = outer * (1.0 + 0.3 * texture) + 0.8 * first + 1.6 * second
    labels = np.zeros(grid.shape[1:], dtype=np.int32)
    labels[first & outer] = 1
    labels[second & outer] = 2
    return gaussian_filter(image, 0.7), labels


def volume(data: np.ndarray) -> SimpleNamespace:
    """An object with .data and .affine, as register_pair takes."""
    return SimpleNamespace(data=data, affine=np.diag([SPACING, SPACING, SPACING, 1.0]))


# the fixed->moving map, in voxels about the grid centre c: y = K (x - c) + c + s
KNOWN_MATRIX = np.array([[1.06, 0.05, 0.0], [-0.04, 0.95, 0.03], [0.02, 0.0, 1.03]])
KNOWN_SHIFT = np.array([1.5, -1.0, 2.0])


@pytest.fixture(scope="session")
def fixed_pair():
    """The fixed phantom (image, labels)."""
    return phantom()


@pytest.fixture(scope="session")
def affine_pair(fixed_pair):
    """(fixed image, fixed labels, moving image, moving labels) related by KNOWN_MATRIX/KNOWN_SHIFT."""
    image, labels = fixed_pair
    center = np.full(3, (SIZE - 1) / 2)
    # scipy samples its input at (matrix o + offset) for every output voxel o: the inverse map
    inverse = np.linalg.inv(KNOWN_MATRIX)
    offset = center - inverse @ (center + KNOWN_SHIFT)
    moving = affine_transform(image, inverse, offset=offset, order=3)
    moving_labels = affine_transform(labels, inverse, offset=offset, order=0)
    return image, labels, moving, moving_labels


@pytest.fixture(scope="session")
def deformed_pair(fixed_pair):
    """(fixed, fixed labels, moving, moving labels) related by a known smooth deformation."""
    image, labels = fixed_pair
    grid = np.stack(np.meshgrid(*[np.arange(SIZE, dtype=float)] * 3, indexing="ij"))
    phase = 2 * np.pi * grid / (SIZE - 1)
    displacement = np.stack([
        3.5 * np.sin(phase[1]) * np.sin(phase[2] / 2),
        3.0 * np.sin(phase[0]) * np.cos(phase[2] / 2),
        3.0 * np.sin(phase[0] / 2) * np.sin(phase[1]),
    ])
    coordinates = grid + displacement
    moving = map_coordinates(image, coordinates, order=3, mode="nearest")
    moving_labels = map_coordinates(labels, coordinates, order=0, mode="nearest").astype(np.int32)
    return image, labels, moving, moving_labels
