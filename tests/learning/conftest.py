"""Tiny synthetic cohorts in the BIDS-derivatives and neurite-OASIS layouts."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch


def synthetic_subject(
    shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two nested ellipsoids (labels 1, 2), randomly shifted and sized, on a noisy background."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.15, 0.15, size=len(shape))
    radii = rng.uniform(0.55, 0.75, size=len(shape))
    distance = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
    labels = np.zeros(shape, dtype=np.int16)
    labels[distance < 1.0] = 1
    labels[distance < 0.5] = 2
    image = np.choose(labels, [10.0, 60.0, 100.0]) + rng.normal(0, 2.0, size=shape)
    return image.astype(np.float32), labels


def write_bids_cohort(
    root: Path,
    *,
    count: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    shapes: dict | None = None,
) -> Path:
    """derivatives/synth/sub-XX/anat/..._space-MNI_desc-preproc_T1w.nii.gz + _dseg; returns root."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        name = f"sub-{index + 1:02d}"
        subject_shape = (shapes or {}).get(name, shape)
        image, labels = synthetic_subject(subject_shape, rng)
        folder = root / "derivatives" / "synth" / name / "anat"
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(
            nib.Nifti1Image(image, affine), folder / f"{name}_space-MNI_desc-preproc_T1w.nii.gz"
        )
        nib.save(nib.Nifti1Image(labels, affine), folder / f"{name}_space-MNI_dseg.nii.gz")
    return root


@pytest.fixture
def cohort_2d(tmp_path: Path) -> Path:
    """Five subjects whose middle axial slices are 32 x 32."""
    return write_bids_cohort(tmp_path / "cohort", count=5, shape=(32, 32, 5))


@pytest.fixture
def cohort_3d(tmp_path: Path) -> Path:
    """Five 16^3 subjects."""
    return write_bids_cohort(tmp_path / "cohort", count=5, shape=(16, 16, 16))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
