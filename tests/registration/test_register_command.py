"""`dynomp register` end to end on small NIfTI files, and its one-line errors for bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dynomp.cli import main

from .conftest import SPACING

AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
TINY = """preset: quick
stages:
  - {name: rigid, iterations: [8, 4, 2]}
  - {name: affine, iterations: [8, 4, 2]}
  - {name: syn, iterations: [6, 4, 2]}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, affine_pair):
    image, labels, moving, moving_labels = affine_pair
    folder = tmp_path_factory.mktemp("register")
    for name, data in [("fixed", image), ("moving", moving)]:
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), folder / f"{name}.nii.gz")
    for name, data in [("fixed_labels", labels), ("moving_labels", moving_labels)]:
        nib.save(nib.Nifti1Image(data.astype(np.int16), AFFINE), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros_like(labels, dtype=np.int16), AFFINE), folder / "empty.nii.gz")
    nib.save(nib.Nifti1Image(labels[:, :, :30].astype(np.int16), AFFINE), folder / "cropped.nii.gz")
    nib.save(nib.Nifti1Image(image[:, :, 0].astype(np.float32), AFFINE), folder / "slice.nii.gz")
    broken = image.astype(np.float32)
    broken[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(broken, AFFINE), folder / "nan.nii.gz")
    (folder / "tiny.yaml").write_text(TINY)
    return folder


def arguments(files, out, arm="fp64", **overrides):
    values = {"--fixed": files / "fixed.nii.gz", "--moving": files / "moving.nii.gz",
              "--fixed-labels": files / "fixed_labels.nii.gz",
              "--moving-labels": files / "moving_labels.nii.gz", "--config": files / "tiny.yaml"}
    values.update(overrides)
    result = ["register", "--arm", arm, "--out", str(out)]
    for key, value in values.items():
        if value is not None:
            result += [key, str(value)]
    return result


@pytest.mark.slow
@pytest.mark.parametrize(("arm", "dtype"), [("fp64", "float64"), ("fp32", "float32")])
def test_register_writes_every_output(files, tmp_path, arm, dtype):
    assert main(arguments(files, tmp_path, arm)) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["arm"] == arm and metrics["status"] == "completed"
    assert metrics["dice_mean"] > 0.85 and set(metrics["dice"]) == {"1", "2"}
    assert 0 < metrics["jaccard_mean"] <= metrics["dice_mean"]
    assert metrics["ncc"] > 0.95 and metrics["jacobian_nonpositive_percent"] == 0.0
    assert metrics["wall_seconds"] > 0 and metrics["peak_rss_bytes"] > 0
    assert set(metrics["seconds_by_format"]) == {arm}
    trace = pd.read_parquet(tmp_path / "trace.parquet")
    assert list(trace.columns) == ["stage", "level", "iteration", "loss", "pmin", "pmin_smoothed",
                                   "format", "seconds"]
    assert len(trace) <= 3 * (8 + 4 + 2) and set(trace["stage"]) == {"rigid", "affine", "syn"}
    for name, shape in [("forward_warp", (32, 32, 32, 1, 3)), ("inverse_warp", (32, 32, 32, 1, 3))]:
        warp = nib.load(tmp_path / f"{name}.nii.gz")
        assert warp.shape == shape and warp.get_data_dtype() == np.dtype(dtype)
    labels = np.asarray(nib.load(tmp_path / "warped_labels.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("overrides", "arm", "message"),
    [
        ({"--moving-labels": "empty.nii.gz"}, "fp64", "empty.nii.gz: the label map is empty"),
        ({"--fixed-labels": "cropped.nii.gz"}, "fp64", "cropped.nii.gz"),
        ({"--moving": "slice.nii.gz", "--moving-labels": None}, "fp64", "slice.nii.gz"),
        ({"--moving": "nan.nii.gz", "--moving-labels": None}, "fp64", "nan.nii.gz"),
        ({}, "fp12", "--arm: unknown arm 'fp12'"),
    ],
)
def test_bad_input_gets_one_line(files, tmp_path, capsys, overrides, arm, message):
    overrides = {k: (files / v if v else None) for k, v in overrides.items()}
    assert main(arguments(files, tmp_path / "out", arm, **overrides)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "out" / "metrics.json").exists()
