"""Training pairs: both layouts, the seeded split and pairs, and the errors on bad datasets."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dynomp.learning.data import (
    PairSampler,
    evaluation_pairs,
    load_subjects,
    pad_to_multiple,
    split_subjects,
    stack_images,
)
from tests.learning.conftest import synthetic_subject, write_bids_cohort


def test_bids_layout_3d_and_middle_slice_2d(cohort_3d: Path) -> None:
    volumes = load_subjects(cohort_3d, dim=3)
    slices = load_subjects(cohort_3d, dim=2)
    assert [s.name for s in volumes] == [f"sub-0{i}" for i in range(1, 6)]
    assert volumes[0].image.shape == (16, 16, 16) and volumes[0].spacing == (2.0, 2.0, 2.0)
    assert volumes[0].image.min() == 0.0 and volumes[0].image.max() == 1.0
    assert volumes[0].image.dtype == np.float32
    np.testing.assert_array_equal(slices[2].labels, volumes[2].labels[:, :, 8])
    assert slices[2].spacing == (2.0, 2.0)
    chosen = load_subjects(cohort_3d, dim=2, slice_index=3)
    np.testing.assert_array_equal(chosen[1].labels, volumes[1].labels[:, :, 3])
    with pytest.raises(ValueError, match="slice_index: 16 outside 0..15"):
        load_subjects(cohort_3d, dim=2, slice_index=16)


def test_oasis_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for index in range(3):
        folder = tmp_path / f"OASIS_OAS1_{index + 1:04d}_MR1"
        folder.mkdir()
        image, labels = synthetic_subject((12, 10, 8), rng)
        nib.save(nib.Nifti1Image(image * 3 + 5, np.eye(4)), folder / "aligned_norm.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "aligned_seg35.nii.gz")
        nib.save(nib.Nifti1Image(image[:, :, 4:5], np.eye(4)), folder / "slice_norm.nii.gz")
        nib.save(nib.Nifti1Image(labels[:, :, 4:5], np.eye(4)), folder / "slice_seg24.nii.gz")
    volumes = load_subjects(tmp_path, dim=3)
    slices = load_subjects(tmp_path, dim=2, layout="oasis")
    assert [s.name for s in volumes][0] == "OASIS_OAS1_0001_MR1"
    assert volumes[1].image.shape == (12, 10, 8) and slices[1].image.shape == (12, 10)
    np.testing.assert_array_equal(slices[2].labels, volumes[2].labels[:, :, 4])
    assert set(np.unique(volumes[0].labels)) == {0, 1, 2}


def test_split_and_pairs_are_seeded(cohort_2d: Path) -> None:
    subjects = load_subjects(cohort_2d, dim=2)
    train, held_out = split_subjects(subjects, held_out_fraction=0.4, seed=3)
    again = split_subjects(subjects, held_out_fraction=0.4, seed=3)
    assert [s.name for s in held_out] == [s.name for s in again[1]]
    assert len(train) == 3 and len(held_out) == 2
    assert not {s.name for s in train} & {s.name for s in held_out}
    sampler = PairSampler(train, batch_size=6, seed=7)
    assert sampler.pair_indices(5) == PairSampler(train, batch_size=6, seed=7).pair_indices(5)
    assert sampler.pair_indices(5) != sampler.pair_indices(6)
    assert all(moving != fixed for moving, fixed in sampler.pair_indices(5))
    moving, fixed = sampler.batch(5)
    assert moving.shape == fixed.shape == (6, 1, 32, 32)
    first_moving, first_fixed = sampler.pair_indices(5)[0]
    np.testing.assert_array_equal(moving[0, 0], train[first_moving].image)
    np.testing.assert_array_equal(fixed[0, 0], train[first_fixed].image)
    assert len(evaluation_pairs(train, held_out)) == 2
    # at least two subjects always stay in training
    small_train, small_held_out = split_subjects(subjects[:3], held_out_fraction=0.9, seed=0)
    assert len(small_train) == 2 and len(small_held_out) == 1
    assert len(evaluation_pairs(small_train, small_held_out)) == 2


def test_fewer_than_two_subjects(tmp_path: Path) -> None:
    write_bids_cohort(tmp_path, count=1, shape=(8, 8, 8))
    with pytest.raises(ValueError, match="found 1 subject"):
        load_subjects(tmp_path, dim=3)


def test_different_shapes_in_one_batch(tmp_path: Path) -> None:
    write_bids_cohort(tmp_path, count=2, shape=(8, 8, 8), shapes={"sub-02": (8, 10, 8)})
    subjects = load_subjects(tmp_path, dim=3)
    with pytest.raises(
        ValueError, match=r"different shapes in one batch: sub-0[12] \(8, 1?[08], 8\) vs sub-0[12]"
    ):
        PairSampler(subjects, batch_size=1, seed=0).batch(1)
    with pytest.raises(ValueError, match="different shapes"):
        stack_images([np.zeros((4, 4)), np.zeros((4, 5))], ["a", "b"])


def test_unknown_layout_and_bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="unknown layout"):
        load_subjects(tmp_path / "empty", dim=3)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_subjects(tmp_path / "missing", dim=3)
    cohort = write_bids_cohort(tmp_path / "broken", count=2, shape=(8, 8, 8))
    image = next(cohort.glob("derivatives/synth/sub-01/anat/*T1w.nii.gz"))
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=f"{image.name}: (not a NIfTI file|cannot be read as NIfTI)"
    ):
        load_subjects(cohort, dim=3)


def test_padding_to_the_networks_multiple(tmp_path: Path) -> None:
    write_bids_cohort(tmp_path, count=2, shape=(30, 17, 5))
    subjects = load_subjects(tmp_path, dim=2)
    padded = pad_to_multiple(subjects, 16)
    assert padded[0].image.shape == padded[0].labels.shape == (32, 32)
    np.testing.assert_array_equal(padded[1].image[:30, :17], subjects[1].image)
    assert padded[1].image[30:].max() == 0 and padded[1].labels[:, 17:].max() == 0
