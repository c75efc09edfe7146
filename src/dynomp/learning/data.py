"""Training pairs for VoxelMorph: subjects on one grid, a seeded train/held-out split, seeded pairs.

Two layouts are read:

- ``bids``: BIDS derivatives already affinely aligned to one template grid,
  ``derivatives/<pipeline>/sub-<id>/anat/sub-<id>_space-<template>_desc-preproc_T1w.nii.gz`` with
  the label map ``sub-<id>_space-<template>_dseg.nii.gz`` beside it (the embedded cohort's layout,
  the analogue of neurite-OASIS's ``aligned_norm``). 2D takes one axial slice (the middle one unless
  `slice_index` is given) of each volume.
- ``oasis``: neurite-OASIS, ``OASIS_OAS1_*_MR1/aligned_norm.nii.gz`` + ``aligned_seg35.nii.gz`` (3D)
  or ``slice_norm.nii.gz`` + ``slice_seg24.nii.gz`` (2D).

Intensities are scaled to [0, 1] per subject. Batches are drawn from a generator seeded by
(seed, step), so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynomp.data.nifti import read_volume

BIDS_IMAGE_PATTERN = "derivatives/*/sub-*/anat/sub-*_space-*_desc-preproc_T1w.nii*"
OASIS_PATTERN = "OASIS_OAS1_*_MR1"
OASIS_FILES = {
    3: ("aligned_norm.nii.gz", "aligned_seg35.nii.gz"),
    2: ("slice_norm.nii.gz", "slice_seg24.nii.gz"),
}


@dataclass(frozen=True)
class Subject:
    """One subject's image (float32 in [0, 1]) and label map (int32) on the shared grid."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]


def _read_nifti(path: Path, *, labels: bool = False) -> tuple[np.ndarray, tuple[float, ...]]:
    volume = read_volume(path, labels=labels)
    data = volume.data if labels else volume.data.astype(np.float32)
    return data, volume.spacing


def _normalise(image: np.ndarray, path: Path) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise ValueError(f"{path}: image is constant ({low})")
    return ((image - low) / (high - low)).astype(np.float32)


def detect_layout(directory: Path) -> str:
    """``bids`` or ``oasis``, from the files present; a ValueError when neither matches."""
    if glob.glob(str(directory / BIDS_IMAGE_PATTERN)):
        return "bids"
    if glob.glob(str(directory / OASIS_PATTERN)):
        return "oasis"
    raise ValueError(
        f"{directory}: unknown layout (expected {BIDS_IMAGE_PATTERN} or {OASIS_PATTERN}/)"
    )


def load_subjects(
    directory: str | Path, *, dim: int, layout: str = "auto", slice_index: int | None = None
) -> list[Subject]:
    """Every subject of a dataset, as 2D slices or 3D volumes; at least two are required."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: dataset directory not found")
    if dim not in (2, 3):
        raise ValueError(f"dim: must be 2 or 3, got {dim!r}")
    if layout == "auto":
        layout = detect_layout(directory)
    if layout == "bids":
        subjects = _load_bids(directory, dim=dim, slice_index=slice_index)
    elif layout == "oasis":
        subjects = _load_oasis(directory, dim=dim)
    else:
        raise ValueError(f"layout: unknown layout {layout!r} (known: auto, bids, oasis)")
    if len(subjects) < 2:
        raise ValueError(
            f"{directory}: found {len(subjects)} subject(s); registration needs at least 2"
        )
    return subjects


def _load_bids(directory: Path, *, dim: int, slice_index: int | None) -> list[Subject]:
    subjects = []
    for image_path in sorted(Path(p) for p in glob.glob(str(directory / BIDS_IMAGE_PATTERN))):
        name = image_path.name.split("_")[0]
        label_name = image_path.name.replace("_desc-preproc_T1w", "_dseg")
        label_path = image_path.with_name(label_name)
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path}: label map missing for {image_path.name}")
        image, spacing = _read_nifti(image_path)
        labels, _ = _read_nifti(label_path, labels=True)
        if image.ndim != 3:
            raise ValueError(f"{image_path}: expected a 3D volume, got shape {image.shape}")
        if labels.shape != image.shape:
            raise ValueError(
                f"{label_path}: shape {labels.shape} differs from the image's {image.shape}"
            )
        if dim == 2:
            index = image.shape[2] // 2 if slice_index is None else slice_index
            if not 0 <= index < image.shape[2]:
                raise ValueError(
                    f"slice_index: {index} outside 0..{image.shape[2] - 1} of {image_path}"
                )
            image, labels, spacing = image[:, :, index], labels[:, :, index], spacing[:2]
        subjects.append(Subject(name, _normalise(image, image_path), labels, spacing))
    return subjects


def _load_oasis(directory: Path, *, dim: int) -> list[Subject]:
    image_name, label_name = OASIS_FILES[dim]
    subjects = []
    for folder in sorted(Path(p) for p in glob.glob(str(directory / OASIS_PATTERN))):
        image_path, label_path = folder / image_name, folder / label_name
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path}: not found")
        if not label_path.is_file():
            raise FileNotFoundError(f"{label_path}: not found")
        image, spacing = _read_nifti(image_path)
        labels, _ = _read_nifti(label_path, labels=True)
        # the 2D slices are stored as (H, W, 1) volumes
        image, labels = np.squeeze(image), np.squeeze(labels)
        if image.ndim != dim:
            raise ValueError(f"{image_path}: expected a {dim}D image, got shape {image.shape}")
        if labels.shape != image.shape:
            raise ValueError(
                f"{label_path}: shape {labels.shape} differs from the image's {image.shape}"
            )
        subjects.append(Subject(folder.name, _normalise(image, image_path), labels, spacing[:dim]))
    return subjects


def pad_to_multiple(subjects: Sequence[Subject], multiple: int) -> list[Subject]:
    """Subjects zero-padded at the end of each axis to a multiple of `multiple` voxels.

    neurite's U-Net halves the grid once per entry of nb_features and its skip connections need
    every halving to be exact: nb_features [16]*5 needs sides divisible by 32 (the embedded
    cohort's 99 x 117 slices become 128 x 128).
    """
    # every subject gets the first one's padding, so subjects on different grids still differ
    # (and fail in a batch) instead of being padded to one shape
    widths = [(0, -side % multiple) for side in subjects[0].image.shape]
    padded = []
    for subject in subjects:
        padded.append(
            Subject(
                subject.name,
                np.pad(subject.image, widths),
                np.pad(subject.labels, widths),
                subject.spacing,
            )
        )
    return padded


def split_subjects(
    subjects: Sequence[Subject], *, held_out_fraction: float, seed: int
) -> tuple[list[Subject], list[Subject]]:
    """Seeded split into (train, held-out): round(fraction * n) held out, at least 2 train."""
    if len(subjects) < 2:
        raise ValueError(f"subjects: found {len(subjects)}; registration needs at least 2")
    order = np.random.default_rng(seed).permutation(len(subjects))
    held_out_count = min(int(round(held_out_fraction * len(subjects))), len(subjects) - 2)
    held_out = sorted((subjects[i] for i in order[:held_out_count]), key=lambda s: s.name)
    train = sorted((subjects[i] for i in order[held_out_count:]), key=lambda s: s.name)
    return train, held_out


def stack_images(images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """(B, 1, *grid) from same-shaped images; a ValueError names the two that differ."""
    first_shape = images[0].shape
    for image, name in zip(images, names, strict=True):
        if image.shape != first_shape:
            raise ValueError(
                f"images of different shapes in one batch: "
                f"{names[0]} {first_shape} vs {name} {image.shape}"
            )
    return np.stack(images)[:, None]


class PairSampler:
    """Draws (moving, fixed) batches of distinct subjects, reproducibly from (seed, step)."""

    def __init__(self, subjects: Sequence[Subject], *, batch_size: int, seed: int) -> None:
        if len(subjects) < 2:
            raise ValueError(f"subjects: found {len(subjects)}; pairs need at least 2")
        self.subjects = list(subjects)
        self.batch_size = batch_size
        self.seed = seed

    def pair_indices(self, step: int) -> list[tuple[int, int]]:
        """The (moving, fixed) subject indices of the batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        count = len(self.subjects)
        pairs = []
        for _ in range(self.batch_size):
            moving = int(rng.integers(count))
            fixed = int(rng.integers(count - 1))
            pairs.append((moving, fixed + (fixed >= moving)))
        return pairs

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Moving and fixed images of `step`, each (B, 1, *grid) float32."""
        pairs = self.pair_indices(step)
        # moving and fixed images are stacked together: the network concatenates them
        chosen = [self.subjects[m] for m, _ in pairs] + [self.subjects[f] for _, f in pairs]
        stacked = stack_images([s.image for s in chosen], [s.name for s in chosen])
        return stacked[: len(pairs)], stacked[len(pairs) :]


def evaluation_pairs(
    train: Sequence[Subject], held_out: Sequence[Subject]
) -> list[tuple[Subject, Subject]]:
    """Held-out (moving, fixed) pairs: every ordered pair of held-out subjects, or, with only one
    held out, that subject onto each training subject."""
    if not held_out:
        raise ValueError(
            "held_out_fraction: no subject is held out, so there is nothing to evaluate"
        )
    if len(held_out) == 1:
        return [(held_out[0], fixed) for fixed in train]
    return [(m, f) for m in held_out for f in held_out if m is not f]
