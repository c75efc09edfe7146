"""The real ANTs arms on a small pair: raw antsRegistration, --float 0/1, trace parsed from its log."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from dynomp.registration.ants_arm import ants_arguments, run_ants
from dynomp.registration.run import write_displacement
from dynomp.registration.config import paper_config, quick_config

from .conftest import SPACING


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory, affine_pair):
    image, _, moving, _ = affine_pair
    folder = tmp_path_factory.mktemp("ants")
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving.astype(np.float32), affine), folder / "moving.nii.gz")
    return folder


def short_config():
    config = quick_config()
    return dataclasses.replace(
        config, stages=tuple(dataclasses.replace(s, iterations=(4, 3, 2)) for s in config.stages)
    )


def test_paper_arguments_are_the_papers_command():
    arguments = " ".join(ants_arguments(fixed="F", moving="M", prefix="p_", config=paper_config(),
                                        single_precision=False))
    assert "--float 0" in arguments and "--random-seed 1" in arguments
    assert "--transform Rigid[0.1] --metric MI[F,M,1,32,Regular,0.25]" in arguments
    assert "--convergence [1000x500x250x100,1e-06,10]" in arguments
    assert "--transform SyN[0.1,3,0] --metric CC[F,M,1,4] --convergence [100x70x50x20,1e-06,10]" in arguments
    assert arguments.count("--shrink-factors 8x4x2x1 --smoothing-sigmas 3x2x1x0vox") == 3


@pytest.mark.slow
@pytest.mark.parametrize(("arm", "dtype"), [("ants-fp64", "float64"), ("ants-fp32", "float32")])
def test_ants_arm_writes_warps_in_its_precision(pair_files, tmp_path, arm, dtype):
    outcome = run_ants(fixed=pair_files / "fixed.nii.gz", moving=pair_files / "moving.nii.gz",
                       config=short_config(), arm=arm, threads=1)
    assert outcome.status == "completed"
    assert outcome.extra["ants_warp_dtype"] == dtype  # the 1Warp.nii.gz antsRegistration wrote
    assert outcome.warp_dtype == dtype
    # 3 stages x 3 levels, 4 + 3 + 2 iterations each at most, all with finite metric values
    assert {(row["stage"], row["level"]) for row in outcome.trace} == {
        (stage, level) for stage in ("rigid", "affine", "syn") for level in range(3)
    }
    assert all(np.isfinite(row["loss"]) and row["seconds"] >= 0 for row in outcome.trace)
    assert {row["format"] for row in outcome.trace} == {dtype.replace("float", "fp")}
    # the known shift is 3, -2, 4 mm in voxel axes; ANTs finds the translation part within 1.5 mm
    mean_shift = outcome.forward_displacement[8:-8, 8:-8, 8:-8].reshape(-1, 3).mean(0)
    assert np.abs(mean_shift - np.array([3.0, -2.0, 4.0])).max() < 1.5
    path = write_displacement(tmp_path / "forward_warp.nii.gz", outcome.forward_displacement,
                              np.diag([SPACING, SPACING, SPACING, 1.0]), outcome.warp_dtype)
    written = nib.load(path)
    assert written.get_data_dtype() == np.dtype(dtype)
    assert written.shape == (32, 32, 32, 1, 3)
    assert written.header.get_intent()[0] == "vector"
    # LPS on disk: x and y negated
    assert np.allclose(np.asarray(written.dataobj)[..., 0, 0], -outcome.forward_displacement[..., 0],
                       atol=1e-5)
