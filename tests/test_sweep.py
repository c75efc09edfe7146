"""`dynomp sweep`: strict sweep files; real sweeps on submitit's local executor and local Slurm."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.ndimage import shift

from dynomp.cli import main
from dynomp.sweep import TABLE_COLUMNS, choose_executor, failure_line, load_sweep, run_sweep
from tests.learning.conftest import write_bids_cohort
from tests.registration.conftest import phantom

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
# the quick pipeline cut to two levels and a few iterations: a 16^3 pair registers in about a second
TINY_REGISTRATION = """preset: quick
stages:
  - {name: rigid, iterations: [6, 3], shrink_factors: [2, 1], smoothing_sigmas: [1, 0]}
  - {name: affine, iterations: [6, 3], shrink_factors: [2, 1], smoothing_sigmas: [1, 0]}
  - {name: syn, iterations: [4, 2], shrink_factors: [2, 1], smoothing_sigmas: [1, 0], cc_radius: 2}
"""
FORMATS = ["bf16", "fp32", "fp64"]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> Path:
    """A 16^3 phantom and a shifted copy, with label maps, and the tiny registration config."""
    folder = tmp_path_factory.mktemp("pair")
    image, labels = phantom(size=16)
    offset = (1.0, -0.5, 0.5)
    volumes = {
        "fixed": image.astype(np.float32),
        "moving": shift(image, offset, order=3).astype(np.float32),
        "fixed_labels": labels.astype(np.int16),
        "moving_labels": shift(labels, offset, order=0).astype(np.int16),
        "flat": np.ones((16, 16), dtype=np.float32),
    }
    for name, data in volumes.items():
        nib.save(nib.Nifti1Image(data, AFFINE), folder / f"{name}.nii.gz")
    (folder / "tiny.yaml").write_text(TINY_REGISTRATION)
    return folder


def registration_sweep(files: Path, **overrides) -> dict:
    """A sweep file's content: 2 windows x 1 format set x 1 pair."""
    sweep = {
        "kind": "registration",
        "registration_config": str(files / "tiny.yaml"),
        "pairs": [{
            "name": "phantom",
            "fixed": str(files / "fixed.nii.gz"),
            "moving": str(files / "moving.nii.gz"),
            "fixed_labels": str(files / "fixed_labels.nii.gz"),
            "moving_labels": str(files / "moving_labels.nii.gz"),
        }],
        "grid": {"window": [3, 5], "formats": [FORMATS], "execution": ["native"]},
    }
    sweep.update(overrides)
    return sweep


def write_sweep(path: Path, sweep: dict) -> Path:
    path.write_text(yaml.safe_dump(sweep))
    return path


def check_registration_table(out: Path, table: pd.DataFrame) -> None:
    """Two completed runs, one per window, with a Dice in [0, 1]: on disk and as returned."""
    on_disk = pd.read_parquet(out / "sweep_metrics.parquet")
    pd.testing.assert_frame_equal(on_disk, table)
    tsv = pd.read_csv(out / "sweep_metrics.tsv", sep="\t")
    assert list(tsv.columns) == list(TABLE_COLUMNS["registration"]) == list(table.columns)
    assert len(tsv) == len(table)
    assert table["run"].nunique() == 2
    assert sorted(table.drop_duplicates("run")["window"]) == [3, 5]
    assert set(table["formats"]) == {"bf16,fp32,fp64"}
    assert set(table["execution"]) == {"native"} and set(table["pair"]) == {"phantom"}
    assert set(table["status"]) == {"completed"}
    dice = table[table["metric"] == "dice_mean"]
    assert len(dice) == 2 and dice["value"].between(0.0, 1.0).all()
    seconds = table[table["metric"].str.startswith("seconds_in_")]
    assert not seconds.empty and (seconds["value"] >= 0).all()
    for run, window in table.drop_duplicates("run")[["run", "window"]].itertuples(index=False):
        parameters = json.loads((out / "runs" / run / "sweep.json").read_text())
        assert parameters["window"] == window and parameters["formats"] == FORMATS
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())
        assert metrics["arm"] == "dynomp"
        assert metrics["config"]["precision"]["window"] == window
        assert metrics["config"]["precision"]["formats"] == FORMATS


# -- the sweep file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"windows": [3]}, "unknown key 'windows'"),
        ({"kind": "segmentation"},
         "kind: expected one of registration, learning, got 'segmentation'"),
        ({"grid": {"windw": [3]}}, "grid: unknown key 'windw'"),
        ({"grid": {"formats": [["fp32"], ["fp32", "fp13"]]}},
         "grid.formats[1]: unknown format 'fp13'"),
        ({"grid": {"formats": ["fp32"]}}, "grid.formats[0]: expected a list of format names"),
        ({"grid": {"execution": ["emulated"]}}, "grid.execution[0]: unknown mode 'emulated'"),
        ({"grid": {}}, "grid: at least one of window, formats, execution is needed"),
        ({"grid": {"window": []}}, "grid.window: expected a non-empty list"),
        ({"grid": {"window": [0]}}, "grid.window[0]: must be an integer >= 1"),
        ({"grid": {"window": [3, 3]}}, "grid.window: a value appears twice"),
        ({"pairs": []}, "pairs: expected a non-empty list"),
        ({"pairs": [{"fixed": "a.nii.gz", "moving": "b.nii.gz", "mask": "c"}]},
         "pairs[0]: unknown key 'mask'"),
        ({"pairs": [{"fixed": "/nonexistent/fixed.nii.gz", "moving": "b.nii.gz"}]},
         "pairs[0].fixed: /nonexistent/fixed.nii.gz not found"),
        ({"registration_config": "/nonexistent/quick.yaml"},
         "registration_config: /nonexistent/quick.yaml not found"),
    ],
)
def test_a_bad_sweep_file_is_one_line_naming_the_key(pair_files, tmp_path, capsys, change, message):
    config = write_sweep(tmp_path / "sweep.yaml", registration_sweep(pair_files, **change))
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--executor", "local",
                 "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith(f"dynomp sweep: error: {config}: ")
    assert message in error
    assert not out.exists()  # nothing was submitted


def test_a_learning_sweep_needs_its_dataset(tmp_path, capsys):
    config = write_sweep(tmp_path / "sweep.yaml", {"kind": "learning", "grid": {"window": [3]}})
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"dynomp sweep: error: {config}: data: required (the dataset directory to train on)\n"
    )


def test_the_job_list_is_the_grid_times_the_pairs(pair_files, tmp_path):
    sweep = registration_sweep(pair_files, grid={
        "window": [2, 8],
        "formats": [["fp64", "bf16"], ["fp32"]],
        "execution": ["native", "virtual"],
    })
    sweep["pairs"].append({**sweep["pairs"][0], "name": "again"})
    jobs = load_sweep(write_sweep(tmp_path / "sweep.yaml", sweep), out=tmp_path / "out")
    assert len(jobs) == 2 * 2 * 2 * 2
    assert len({job.run for job in jobs}) == len(jobs)
    # format sets are kept cheapest first, as the controller orders them
    assert {job.formats for job in jobs} == {("bf16", "fp64"), ("fp32",)}
    first = jobs[0]
    assert first.run == "phantom_w2_bf16-fp64_native"
    assert first.out == str((tmp_path / "out" / "runs" / first.run).resolve())
    assert Path(first.fixed).is_absolute() and first.kind == "registration"


def test_a_grid_key_left_out_keeps_the_config_value(pair_files, tmp_path):
    sweep = registration_sweep(pair_files, grid={"window": [4]})
    (job,) = load_sweep(write_sweep(tmp_path / "sweep.yaml", sweep), out=tmp_path / "out")
    # quick.yaml sets no precision: the defaults of RegistrationConfig
    expected = (4, ("bf16", "fp16", "fp32", "fp64"), "native")
    assert (job.window, job.formats, job.execution) == expected


def test_auto_runs_locally_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert choose_executor("auto") == "local"
    with pytest.raises(ValueError, match=r"^--executor slurm: sbatch is not on PATH$"):
        choose_executor("slurm")


def test_a_failed_job_is_named_by_its_exception():
    relayed = RuntimeError(
        "Job (task=0) failed during processing with trace:\n----------------------\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "ValueError: flat.nii.gz: 2-D image\n\n----------------------\n"
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
        "  - /tmp/1_0_log.err\n  - /tmp/1_0_log.out"
    )
    assert failure_line(relayed) == "ValueError: flat.nii.gz: 2-D image"
    killed = RuntimeError("Job 12_1 (task: 0) with path /tmp/x has not produced any output "
                          "(state: OUT_OF_MEMORY)\nError stream produced:\n----------")
    assert failure_line(killed).endswith("(state: OUT_OF_MEMORY)")


# -- real sweeps ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_registration_sweep_runs_locally(pair_files, tmp_path, capsys):
    config = write_sweep(tmp_path / "sweep.yaml", registration_sweep(pair_files))
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--executor", "local",
                 "--max-parallel", "2", "--quiet"]) == 0
    assert capsys.readouterr().out == f"{out / 'sweep_metrics.parquet'}: 2 run(s) on local\n"
    check_registration_table(out, pd.read_parquet(out / "sweep_metrics.parquet"))
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["executor"] == "local" and summary["kind"] == "registration"
    assert [run["status"] for run in summary["runs"]] == ["completed", "completed"]


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_others_kept(pair_files, tmp_path, capsys):
    sweep = registration_sweep(pair_files, grid={"window": [3]})
    sweep["pairs"].append({"name": "flat", "fixed": str(pair_files / "fixed.nii.gz"),
                           "moving": str(pair_files / "flat.nii.gz")})
    config = write_sweep(tmp_path / "sweep.yaml", sweep)
    out = tmp_path / "sweep"
    # what an earlier sweep into the same folder left: not a result of this one
    stale = out / "runs" / "flat_w3_bf16-fp16-fp32-fp64_native" / "metrics.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"status": "completed", "dice_mean": 0.9}))
    assert main(["sweep", "--config", str(config), "--out", str(out), "--executor", "local",
                 "--quiet"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1
    assert errors[0].startswith("dynomp sweep: run flat_w3_bf16-fp16-fp32-fp64_native (job ")
    assert "ValueError: " in errors[0] and "flat.nii.gz: 2-D image" in errors[0]
    table = pd.read_parquet(out / "sweep_metrics.parquet")
    assert set(table["run"]) == {"phantom_w3_bf16-fp16-fp32-fp64_native"}
    assert not stale.exists()
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [run["status"] for run in runs] == ["completed", "failed"]
    assert Path(runs[1]["stderr"]).is_file()


@pytest.mark.slow
def test_a_learning_sweep_runs_locally(tmp_path):
    data = write_bids_cohort(tmp_path / "cohort", count=5, shape=(32, 32, 5))
    learning_config = tmp_path / "learning.yaml"
    learning_config.write_text("task: registration\nbatch_size: 2\nnb_features: [4, 4, 4, 4]\n")
    config = write_sweep(tmp_path / "sweep.yaml", {
        "kind": "learning", "learning_config": str(learning_config), "data": str(data), "dim": 2,
        "steps": 3, "seeds": [7], "grid": {"window": [2], "formats": [["bf16", "fp32"]],
                                          "execution": ["virtual"]},
    })
    result = run_sweep(config, out=tmp_path / "sweep", executor="local", progress=False)
    table = result.table
    assert list(table.columns) == list(TABLE_COLUMNS["learning"])
    assert set(table["run"]) == {"seed7_w2_bf16-fp32_virtual"}
    assert set(table["seed"]) == {7} and set(table["status"]) == {"completed"}
    values = table.set_index("metric")["value"]
    assert values["steps_done"] == 3
    assert np.isfinite(values["final_loss_total"])
    assert values[[m for m in values.index if m.startswith("seconds_in_")]].sum() > 0
    status = json.loads((tmp_path / "sweep" / "runs" / "seed7_w2_bf16-fp32_virtual" /
                         "status.json").read_text())
    assert status["config"]["arm"] == "dynomp" and status["config"]["seed"] == 7
    assert status["config"]["window"] == 2 and status["config"]["formats"] == ["bf16", "fp32"]
    assert status["config"]["execution"] == "virtual"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_registration_sweep_runs_as_a_slurm_job_array(local_slurm, pair_files, tmp_path):
    assert choose_executor("auto") == "slurm"
    config = write_sweep(tmp_path / "sweep.yaml", registration_sweep(pair_files))
    out = tmp_path / "sweep"
    result = run_sweep(config, out=out, executor="slurm", partition=local_slurm.partition,
                       account=local_slurm.account, max_parallel=2, progress=False)
    job_ids = [outcome.job_id for outcome in result.outcomes]
    # one job array: ARRAYID_0, ARRAYID_1
    assert len({job_id.split("_")[0] for job_id in job_ids}) == 1
    assert sorted(job_id.split("_")[1] for job_id in job_ids) == ["0", "1"]
    assert local_slurm.sacct_states(job_ids) == dict.fromkeys(job_ids, "COMPLETED")
    assert result.failures == [] and result.executor == "slurm"
    check_registration_table(out, result.table)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["executor"] == "slurm" and summary["account"] == local_slurm.account
    assert [run["job_id"] for run in summary["runs"]] == job_ids
