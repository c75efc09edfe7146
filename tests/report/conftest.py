"""A small study laid out as the workflow lays it out, written by the real commands' library code.

results/registration/sub-0S/<ARM>: `register_files` on three 16^3 phantom pairs with the arms fp64,
fp32 and dynomp, and fp16 on sub-01's pair with its intensities scaled by 1e6 (past fp16's largest
value, 65504, so the fp16 arm diverges at its first iteration). results/learning/2d/<ARM>:
`train` for 3 steps of a tiny 2-D VoxelMorph with fp32, dynomp and fp16 (which diverges at step
2, see tests/learning/test_train.py); results/learning/3d/fp32: the same arm in 3-D, so that two
runs share an arm. `evaluate_model` on every run, as the workflow does (a diverged run gets an
empty table).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import affine_transform

from dynomp.learning.config import load_config
from dynomp.learning.evaluate import evaluate_model
from dynomp.learning.train import train
from dynomp.registration.config import quick_config
from dynomp.registration.run import register_files
from tests.learning.conftest import write_bids_cohort
from tests.registration.conftest import phantom

SIZE = 16
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
SUBJECTS = ("sub-01", "sub-02", "sub-03")
REGISTRATION_ARMS = ("fp64", "fp32", "dynomp")
DIVERGING_RUN = ("sub-01", "fp16")
LEARNING_ARMS = ("fp32", "dynomp", "fp16")
LEARNING_RUNS = (*(("2d", arm) for arm in LEARNING_ARMS), ("3d", "fp32"))
LEARNING_STEPS = 3


def tiny_registration_config():
    """The quick preset cut to two levels (2x, 1x) of 6 and 4 iterations per stage."""
    quick = quick_config()
    stages = tuple(
        dataclasses.replace(stage, iterations=(6, 4), shrink_factors=(2, 1),
                            smoothing_sigmas=(1.0, 0.0))
        for stage in quick.stages
    )
    return dataclasses.replace(quick, stages=stages)


def write_pair(folder: Path, *, seed: int, shift: tuple[float, float, float],
               scale: float = 1.0) -> dict[str, Path]:
    """A phantom and an affinely moved copy of it, intensities times `scale`, with label maps."""
    image, labels = phantom(SIZE, seed=seed)
    image = image * scale
    matrix = np.array([[1.06, 0.05, 0.0], [-0.04, 0.95, 0.03], [0.02, 0.0, 1.03]])
    inverse = np.linalg.inv(matrix)
    center = np.full(3, (SIZE - 1) / 2)
    offset = center - inverse @ (center + np.asarray(shift))
    moving = affine_transform(image, inverse, offset=offset, order=3)
    moving_labels = affine_transform(labels, inverse, offset=offset, order=0)
    folder.mkdir(parents=True)
    files = {}
    for name, data in (("fixed", image.astype(np.float32)), ("moving", moving.astype(np.float32)),
                       ("fixed_labels", labels.astype(np.int16)),
                       ("moving_labels", moving_labels.astype(np.int16))):
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), files[name])
    return files


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> dict[str, object]:
    """The study's root, its registration and learning run folders and the cohort."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("study")
    config = tiny_registration_config()
    registration_runs = []
    for index, subject in enumerate(SUBJECTS):
        shift = (0.8 - 0.3 * index, -0.5, 1.0)
        files = write_pair(root / "inputs" / subject, seed=index, shift=shift)
        runs = [(arm, files) for arm in REGISTRATION_ARMS]
        if subject == DIVERGING_RUN[0]:
            runs.append((DIVERGING_RUN[1], write_pair(root / "inputs" / f"{subject}-overflow",
                                                      seed=index, shift=shift, scale=1e6)))
        for arm, files in runs:
            run = root / "registration" / subject / arm
            register_files(fixed=files["fixed"], moving=files["moving"], arm=arm, out=run,
                           fixed_labels=files["fixed_labels"],
                           moving_labels=files["moving_labels"], config=config, threads=1)
            registration_runs.append(run)
    cohorts = {"2d": write_bids_cohort(root / "cohort-2d", count=5, shape=(32, 32, 5)),
               "3d": write_bids_cohort(root / "cohort-3d", count=5, shape=(16, 16, 16))}
    learning_runs = []
    for dim, arm in LEARNING_RUNS:
        run = root / "learning" / dim / arm
        training = load_config(arm=arm, dim=int(dim[0]), steps=LEARNING_STEPS,
                               nb_features=(4, 4, 4) if dim == "2d" else (4, 4),
                               held_out_fraction=0.4, checkpoint_every=LEARNING_STEPS)
        train(training, data=cohorts[dim], out=run, progress=False)
        evaluate_model(run=run, data=cohorts[dim], out=run / "evaluation.parquet")
        learning_runs.append(run)
    torch.set_num_threads(threads)
    return {"root": root, "registration_runs": registration_runs,
            "learning_runs": learning_runs}


@pytest.fixture(scope="session")
def study_tables(study, tmp_path_factory) -> Path:
    """`write_tables` over the whole study."""
    from dynomp.report.tables import write_tables

    out = tmp_path_factory.mktemp("tables")
    write_tables(out=out, registration_runs=study["registration_runs"],
                 learning_runs=study["learning_runs"])
    return out
