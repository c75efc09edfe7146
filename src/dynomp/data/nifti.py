"""NIfTI reading and writing with validation: bad input fails early, naming the file and the problem."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dynomp.atomic import atomic_path

# The affine's 3x3 part is singular below this |determinant| (mm^3 per voxel).
SINGULAR_AFFINE_TOLERANCE = 1e-9
GRID_AFFINE_TOLERANCE = 1e-4


class NiftiError(ValueError):
    """A NIfTI file that cannot be used; the message is '<path>: <problem>'."""


@dataclass(frozen=True)
class Volume:
    """A 2-D or 3-D image or label map with its voxel-to-world affine (RAS+, as nibabel)."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel sizes in millimetres, one per axis."""
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in sizes[: self.data.ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's shape."""
        return tuple(self.data.shape)


def read_volume(path: str | os.PathLike, *, labels: bool = False) -> Volume:
    """Read and validate a 2-D/3-D NIfTI image (float64) or label map (int32, labels=True)."""
    path = Path(path)
    if not path.exists():
        raise NiftiError(f"{path}: no such file")
    if path.is_dir():
        raise NiftiError(f"{path}: is a directory, not a NIfTI file")
    try:
        image = nib.load(str(path))
        raw = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NiftiError(f"{path}: cannot be read as NIfTI (truncated or corrupt: {problem})") from None
    except nib.filebasedimages.ImageFileError as error:
        raise NiftiError(f"{path}: not a NIfTI file ({error})") from None
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim > 3:
        raise NiftiError(f"{path}: {raw.ndim}-D image with shape {raw.shape}, expected 3-D")
    if raw.ndim < 2:
        raise NiftiError(f"{path}: {raw.ndim}-D data with shape {raw.shape}, expected 3-D")
    if 0 in raw.shape:
        raise NiftiError(f"{path}: zero-size dimension in shape {raw.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < SINGULAR_AFFINE_TOLERANCE:
        raise NiftiError(f"{path}: singular or non-finite affine (voxel-to-world matrix)")
    if np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.complexfloating):
        finite = np.isfinite(raw)
        if not finite.all():
            bad = int(raw.size - finite.sum())
            raise NiftiError(f"{path}: {bad} NaN or infinite voxel(s)")
    if labels:
        values = np.asarray(raw)
        if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
            raise NiftiError(f"{path}: label map has non-integer values")
        if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
            raise NiftiError(f"{path}: label values do not fit in int32")
        data = values.astype(np.int32)
    else:
        data = np.asarray(raw, dtype=np.float64)
    return Volume(data=data, affine=affine, path=path)


def write_volume(
    path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *, dtype: str | np.dtype | None = None
) -> Path:
    """Write a NIfTI file atomically (temp file + rename), in `dtype` if given."""
    array = np.asarray(data)
    if dtype is not None:
        array = array.astype(dtype)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return Path(path)


def write_itk_displacement(
    path: str | os.PathLike, displacement_ras: np.ndarray, affine: np.ndarray, *, dtype: str = "float32"
) -> Path:
    """A displacement field (X, Y, Z, 3) in RAS mm, written as ANTs/ITK read it: (X, Y, Z, 1, 3),
    vector intent, LPS millimetres."""
    lps = np.asarray(displacement_ras) * np.array([-1.0, -1.0, 1.0])
    data = lps.reshape(*lps.shape[:3], 1, 3).astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.header.set_intent("vector", (), "")
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return Path(path)


def check_same_grid(first: Volume, second: Volume, *, first_name: str, second_name: str) -> None:
    """NiftiError (naming the second file) unless both volumes share shape and affine."""
    if first.shape != second.shape:
        raise NiftiError(
            f"{second_name}: grid shape {second.shape} differs from {first_name} shape {first.shape}"
        )
    if not np.allclose(first.affine, second.affine, atol=GRID_AFFINE_TOLERANCE):
        raise NiftiError(f"{second_name}: affine differs from {first_name}'s (not on the same grid)")
