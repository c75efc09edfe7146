"""A small synthetic whole head: an ellipsoidal brain inside CSF, skull and scalp shells."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BRAIN_RADII_MM = (62.0, 78.0, 56.0)


def ellipsoid_head(
    *, spacing: tuple[float, float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A T1-like head (brain 100 with texture, CSF 15, skull 8, scalp 90, noise), its brain mask, its affine."""
    rng = np.random.default_rng(seed)
    spacing_array = np.asarray(spacing, dtype=np.float64)
    extent_mm = np.array([200.0, 236.0, 188.0])
    shape = tuple(int(n) for n in np.round(extent_mm / spacing_array))
    centre_mm = (np.array(shape) - 1) * spacing_array / 2 + np.array([3.0, -5.0, 4.0])
    coordinates = [
        np.arange(n) * step - centre
        for n, step, centre in zip(shape, spacing_array, centre_mm, strict=True)
    ]
    x, y, z = np.meshgrid(*coordinates, indexing="ij")
    radius = np.sqrt(
        (x / BRAIN_RADII_MM[0]) ** 2 + (y / BRAIN_RADII_MM[1]) ** 2 + (z / BRAIN_RADII_MM[2]) ** 2
    )
    # distance outside the brain in mm, approximately, scaled by the smallest radius
    outside_mm = (radius - 1.0) * min(BRAIN_RADII_MM)
    brain = radius <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    image = np.where(brain, 100.0 + 60.0 * texture, 0.0)
    image[(outside_mm > 0) & (outside_mm <= 3)] = 15.0
    image[(outside_mm > 3) & (outside_mm <= 9)] = 8.0
    image[(outside_mm > 9) & (outside_mm <= 15)] = 90.0
    image = np.abs(ndimage.gaussian_filter(image, 0.5) + rng.normal(0.0, 3.0, shape))
    affine = np.diag([*spacing_array, 1.0])
    affine[:3, 3] = -centre_mm
    return image, brain.astype(np.uint8), affine
