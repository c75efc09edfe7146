"""Brain extraction with BET's deformable surface (Smith 2002), through the brainextractor package.

BET inflates a tessellated sphere from the head's centre of gravity; each vertex moves under a
tangential smoothing force, a curvature-dependent normal smoothing force, and an intensity force
that pushes it outwards while the intensity along its inward normal stays above a local threshold
set by the fractional threshold (0.7 by default, BET publishes 0.5: smaller gives larger brains). brainextractor
implements that loop (numba); two of its parts are replaced here, with the numbers that decided it
(synthetic 2 mm whole head made from the MNI152 2009a template, Dice against the true mask):

- its `compute_mask` voxelises the surface with trimesh and places the filled volume up to one voxel
  off (Dice 0.957; shifting the mask by one voxel along any axis raises it to 0.962-0.965):
  `surface_to_mask` rasterises the closed surface exactly (parity along each voxel column): 0.988;
- its curvature force compares the local radius of curvature, measured in voxels, with rmin and
  rmax given in millimetres, which at 2 mm doubles the smoothing; rmin and rmax are passed in
  voxels here: 0.990.

Anisotropic images are resampled to isotropic voxels for the surface (BET's forces assume them);
the surface is then rasterised on the original grid, so the mask always shares the input's grid.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dynomp import __version__
from dynomp.atomic import write_json_atomic
from dynomp.data.nifti import Volume, read_volume, write_volume

METHODS = ("bet",)
DEFAULT_METHOD = "bet"
# BET's published default is 0.5. On the one real whole-head scan here (Colin27, neck in the field
# of view) 0.5 leaks into the neck (Dice 0.939 vs its reference) and 0.7 does not (0.967), while
# the cohort stays at 0.979 (0.983 at 0.5): docs/benchmarks.md, "Brain extraction".
DEFAULT_FRACTIONAL_THRESHOLD = 0.7
DEFAULT_ITERATIONS = 1000
# BET's published smoothness limits (Smith 2002), millimetres
MINIMUM_RADIUS_OF_CURVATURE_MM = 3.33
MAXIMUM_RADIUS_OF_CURVATURE_MM = 10.0
# voxel sizes that differ by more than this fraction count as anisotropic
ANISOTROPY_TOLERANCE = 0.05
# rays through voxel centres are shifted by this much (voxels, irrational) so that none passes
# exactly through a mesh edge or vertex, where it would be counted twice
RAY_OFFSET = (1e-6 * np.pi, 1e-6 * np.e)
PIPELINE_NAME = "dynomp"
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class BrainExtraction:
    """A brain mask (uint8, 1 = brain) and the masked image, on the input's grid."""

    mask: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    method: str
    parameters: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def volume_ml(self) -> float:
        """The brain mask's volume in millilitres."""
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        return float(self.mask.sum()) * voxel_ml


def check_method(name: str) -> str:
    """The method name, or ValueError naming --method and the choices."""
    if name not in METHODS:
        raise ValueError(
            f"--method: unknown brain-extraction method {name!r} (choose from: {', '.join(METHODS)})"
        )
    return name


def surface_to_mask(vertices: np.ndarray, faces: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxels (centres at integer coordinates) inside a closed triangle mesh given in voxel coordinates."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    size_x, size_y, size_z = (int(n) for n in shape)
    # toggles[i, j, k] counts surface crossings of column (i, j) between voxel k-1 and voxel k;
    # a voxel is inside when an odd number of crossings lies below it
    toggles = np.zeros((size_x, size_y, size_z + 1), dtype=np.int32)
    offset = np.asarray(RAY_OFFSET)
    upper = np.array([size_x - 1, size_y - 1])
    for a, b, c in vertices[faces]:
        low = np.maximum(np.ceil(np.minimum(np.minimum(a, b), c)[:2] - offset).astype(int), 0)
        high = np.minimum(np.floor(np.maximum(np.maximum(a, b), c)[:2] - offset).astype(int), upper)
        if (high < low).any():
            continue
        denominator = (b[1] - c[1]) * (a[0] - c[0]) + (c[0] - b[0]) * (a[1] - c[1])
        if denominator == 0.0:
            continue  # the triangle is edge-on to the rays
        column_x, column_y = np.meshgrid(
            np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1), indexing="ij"
        )
        column_x, column_y = column_x.ravel(), column_y.ravel()
        ray_x, ray_y = column_x + offset[0], column_y + offset[1]
        weight_a = ((b[1] - c[1]) * (ray_x - c[0]) + (c[0] - b[0]) * (ray_y - c[1])) / denominator
        weight_b = ((c[1] - a[1]) * (ray_x - c[0]) + (a[0] - c[0]) * (ray_y - c[1])) / denominator
        weight_c = 1.0 - weight_a - weight_b
        hit = (weight_a >= 0) & (weight_b >= 0) & (weight_c >= 0)
        if not hit.any():
            continue
        crossing_z = weight_a[hit] * a[2] + weight_b[hit] * b[2] + weight_c[hit] * c[2]
        first_voxel_above = np.clip(np.ceil(crossing_z), 0, size_z).astype(int)
        np.add.at(toggles, (column_x[hit], column_y[hit], first_voxel_above), 1)
    return (np.cumsum(toggles, axis=2)[..., :size_z] % 2).astype(bool)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _isotropic_image(data: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """The image on isotropic voxels of the finest spacing, the spacing, and iso-to-input voxel scales."""
    finest = float(spacing.min())
    if spacing.max() <= finest * (1.0 + ANISOTROPY_TOLERANCE):
        return data, float(spacing.mean()), np.ones(3)
    scales = finest / spacing
    shape = tuple(
        int(np.floor((n - 1) / scale)) + 1 for n, scale in zip(data.shape, scales, strict=True)
    )
    coordinates = np.indices(shape, dtype=np.float64) * scales[:, None, None, None]
    resampled = ndimage.map_coordinates(data, coordinates, order=1, mode="nearest")
    return resampled, finest, scales


def _bet_surface(
    data: np.ndarray, *, spacing: float, fractional_threshold: float, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run BET's surface evolution; vertices in voxel coordinates and triangle indices."""
    from brainextractor import BrainExtractor

    image = nib.Nifti1Image(data.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0]))
    # brainextractor prints its progress on every iteration
    with contextlib.redirect_stdout(io.StringIO()):
        extractor = BrainExtractor(
            image,
            bt=fractional_threshold,
            rmin=MINIMUM_RADIUS_OF_CURVATURE_MM / spacing,
            rmax=MAXIMUM_RADIUS_OF_CURVATURE_MM / spacing,
        )
        extractor.run(iterations=iterations)
    return np.asarray(extractor.vertices), np.asarray(extractor.faces)


def _check_image(volume: Volume, name: str) -> None:
    if volume.data.ndim != 3:
        raise ValueError(f"{name}: brain extraction needs a 3-D image, got shape {volume.shape}")
    if min(volume.shape) < 8:
        raise ValueError(f"{name}: image of shape {volume.shape} is too small for brain extraction")
    if float(volume.data.max()) <= float(volume.data.min()):
        raise ValueError(
            f"{name}: image is constant ({float(volume.data.min()):g} everywhere), nothing to extract"
        )


def extract_brain(
    volume: Volume,
    *,
    method: str = DEFAULT_METHOD,
    fractional_threshold: float = DEFAULT_FRACTIONAL_THRESHOLD,
    iterations: int = DEFAULT_ITERATIONS,
) -> BrainExtraction:
    """Extract the brain from a whole-head T1-weighted image; the mask is on the image's grid."""
    name = str(volume.path) if volume.path is not None else "image"
    check_method(method)
    if not 0.0 < fractional_threshold < 1.0:
        raise ValueError(
            f"--fractional-threshold: must be between 0 and 1 (exclusive), got {fractional_threshold!r}"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"--iterations: need a positive integer, got {iterations!r}")
    _check_image(volume, name)
    started = time.perf_counter()
    data = np.asarray(volume.data, dtype=np.float64)
    isotropic, spacing, scales = _isotropic_image(data, _spacing(volume.affine))
    vertices, faces = _bet_surface(
        isotropic, spacing=spacing, fractional_threshold=fractional_threshold, iterations=iterations
    )
    inside = surface_to_mask(vertices * scales, faces, data.shape)
    # a surface folded onto itself leaves parity holes; the brain has none
    inside = ndimage.binary_fill_holes(inside)
    if not inside.any():
        raise ValueError(
            f"{name}: brain extraction found no brain (empty mask); is this a head image?"
        )
    mask = inside.astype(np.uint8)
    parameters = {
        "FractionalThreshold": float(fractional_threshold),
        "Iterations": int(iterations),
        "SurfaceSpacingMillimetres": float(spacing),
    }
    return BrainExtraction(
        mask=mask,
        brain=np.where(inside, data, 0.0),
        affine=np.asarray(volume.affine, dtype=np.float64),
        method=method,
        parameters=parameters,
        seconds=time.perf_counter() - started,
    )


def _check_output_path(path: Path, option: str) -> Path:
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{option}: {path} must end in .nii or .nii.gz")
    if path.exists() and path.is_dir():
        raise ValueError(f"{option}: {path} is a directory")
    return path


def _method_description(method: str) -> str:
    from importlib.metadata import version

    return f"BET (Smith 2002, Hum Brain Mapp 17:143) via brainextractor {version('brainextractor')}"


def sidecar_path(image_path: str | os.PathLike) -> Path:
    """The JSON sidecar beside a NIfTI file (same name, .json)."""
    path = Path(image_path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_suffix(".json")


def extract_brain_file(
    t1: str | os.PathLike,
    *,
    mask: str | os.PathLike,
    brain: str | os.PathLike,
    method: str = DEFAULT_METHOD,
    fractional_threshold: float = DEFAULT_FRACTIONAL_THRESHOLD,
    iterations: int = DEFAULT_ITERATIONS,
    sources: Sequence[str] | None = None,
) -> BrainExtraction:
    """Extract the brain from a T1w NIfTI; write the mask and brain (with JSON sidecars) atomically."""
    t1, mask, brain = (
        Path(t1),
        _check_output_path(Path(mask), "--mask"),
        _check_output_path(Path(brain), "--brain"),
    )
    if mask.resolve() == brain.resolve():
        raise ValueError(f"--brain: {brain} is the same file as --mask")
    if t1.is_symlink() and not t1.exists():
        raise ValueError(
            f"{t1}: file content is not present (an annexed file not fetched yet: `datalad get {t1}`)"
        )
    check_method(method)
    result = extract_brain(
        read_volume(t1),
        method=method,
        fractional_threshold=fractional_threshold,
        iterations=iterations,
    )
    provenance = {
        "Sources": list(sources) if sources is not None else [str(t1)],
        "Method": _method_description(method),
        **result.parameters,
        "GeneratedBy": f"dynomp {__version__}",
    }
    write_volume(mask, result.mask, result.affine, dtype=np.uint8)
    write_json_atomic(
        sidecar_path(mask),
        {"Type": "Brain", **provenance, "VolumeMillilitres": round(result.volume_ml, 3)},
    )
    write_volume(brain, result.brain, result.affine, dtype=np.float32)
    write_json_atomic(sidecar_path(brain), {"SkullStripped": True, **provenance})
    return result


def derivative_paths(
    t1_relative: str | os.PathLike, *, derivatives: str | os.PathLike
) -> tuple[Path, Path]:
    """BIDS-derivatives names (mask, brain) for a T1w image given relative to its dataset."""
    relative = Path(t1_relative)
    name = relative.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith("_T1w" + suffix):
            stem = name[: -len("_T1w" + suffix)]
            break
    else:
        raise ValueError(
            f"{t1_relative}: not a BIDS T1w image name (expected ..._T1w.nii or ..._T1w.nii.gz)"
        )
    folder = Path(derivatives) / relative.parent
    return folder / f"{stem}_desc-brain_mask.nii.gz", folder / f"{stem}_desc-brain_T1w.nii.gz"


def derivatives_folder(bids_root: str | os.PathLike) -> Path:
    """The folder brain extraction writes into: DIR/derivatives/dynomp."""
    return Path(bids_root) / "derivatives" / PIPELINE_NAME


def write_derivatives_description(folder: str | os.PathLike) -> Path:
    """Write dataset_description.json for the dynomp derivatives unless one is already there."""
    path = Path(folder) / "dataset_description.json"
    if not path.exists():
        write_json_atomic(
            path,
            {
                "Name": "dynomp derivatives",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "dynomp", "Version": __version__}],
            },
        )
    return path


def extract_brain_dataset(
    bids_root: str | os.PathLike,
    *,
    subjects: Sequence[str] | None = None,
    method: str = DEFAULT_METHOD,
    fractional_threshold: float = DEFAULT_FRACTIONAL_THRESHOLD,
    iterations: int = DEFAULT_ITERATIONS,
    progress: bool = True,
) -> list[dict]:
    """Brain-extract every T1w image of a BIDS dataset into DIR/derivatives/dynomp; one record per image."""
    from tqdm import tqdm

    from dynomp.data.sources import t1w_files

    root = Path(bids_root)
    if not root.is_dir():
        raise ValueError(f"--bids: {root} is not a directory")
    check_method(method)
    images = t1w_files(root, subjects=subjects)
    derivatives = derivatives_folder(root)
    write_derivatives_description(derivatives)
    records = []
    for relative in tqdm(images, desc="brain extraction", unit="image", disable=not progress):
        mask, brain = derivative_paths(relative, derivatives=derivatives)
        result = extract_brain_file(
            root / relative,
            mask=mask,
            brain=brain,
            method=method,
            fractional_threshold=fractional_threshold,
            iterations=iterations,
            sources=[f"bids:raw:{relative.as_posix()}"],
        )
        records.append(
            {
                "subject": relative.parts[0].removeprefix("sub-"),
                "t1w": str(root / relative),
                "mask": str(mask),
                "brain": str(brain),
                "volume_ml": result.volume_ml,
                "seconds": result.seconds,
            }
        )
    return records
