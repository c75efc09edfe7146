"""The Snakefile: dry runs of every shipped study, errors before any job, and a tiny study end to end."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dynomp.workflow import rule_name
from tests.workflow.conftest import (
    REPOSITORY,
    dynomp,
    job_counts,
    snakemake,
    tiny_config,
    write_config,
)

REPORT_RULES = {"run_lists", "tables", "stats", "figures", "all"}


def test_the_default_study_dry_runs_every_subject_and_arm(tmp_path: Path) -> None:
    result = snakemake("-n", "--cores", "2", "--configfile",
                       str(REPOSITORY / "configs" / "default.yaml"),
                       "--config", f"results={tmp_path / 'results'}")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    subjects = 4
    expected = {"cohort": 1, "fetch": 1, "template": 1, "brain_extraction": subjects}
    expected |= {rule_name("register", arm): subjects
                 for arm in ("ants-fp64", "fp64", "fp32", "bf16", "dynomp")}
    expected |= {rule_name(kind, arm): 1 for kind in ("train", "evaluate")
                 for arm in ("fp32", "amp", "amp-bf16", "bf16", "fp16", "dynomp")}
    expected |= dict.fromkeys(REPORT_RULES, 1)
    assert counts == expected | {"total": sum(expected.values())}


def test_the_corr_study_dry_runs_through_datalad_and_templateflow(tmp_path: Path) -> None:
    result = snakemake("-n", "-p", "--cores", "2", "--configfile",
                       str(REPOSITORY / "configs" / "corr-bmb1.yaml"),
                       "--config", f"results={tmp_path / 'results'}")
    assert result.returncode == 0, result.stderr
    assert "dynomp fetch --source ///corr/RawDataBIDS/BMB_1" in result.stdout
    assert "/results/corr-bmb1/templateflow --template MNI152NLin2009cAsym --resolution 1" \
        in result.stdout
    # the 50 subjects are read from the clone, so the dry run stops at the checkpoint
    assert "DAG of jobs will be updated after completion" in result.stdout
    counts = job_counts(result.stdout)
    assert counts["fetch"] == 1 and counts["template"] == 1


def test_the_oasis_study_dry_runs_2d_and_3d_for_every_strategy(tmp_path: Path) -> None:
    result = snakemake("-n", "-p", "--cores", "2", "--configfile",
                       str(REPOSITORY / "configs" / "oasis.yaml"),
                       "--config", f"results={tmp_path / 'results'}")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    for arm in ("fp32", "amp", "amp-bf16", "bf16", "fp16", "dynomp"):
        assert counts[rule_name("train", arm)] == 2 and counts[rule_name("evaluate", arm)] == 2
    assert "neurite-oasis.v1.0.tar --dest " in result.stdout and "--layout oasis" in result.stdout
    assert "--dim 3 --config configs/learning/paper.yaml --device cuda" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"registration__arms": ["fp64", "fp128"]},
         "error: config key registration.arms[1]: 'fp128' is not one of"),
        ({"data": {"source": "missing-dataset", "subjects": ["01"], "also": ["derivatives/x"]}},
         "error: config key data.source: missing-dataset does not exist (missing dataset"),
        ({"registration__iterations": 5}, "error: config key registration.iterations: unknown key"),
    ],
)
def test_a_bad_config_stops_before_any_job(tmp_path: Path, change: dict, message: str) -> None:
    config = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, **change))
    result = snakemake("--cores", "1", "--configfile", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "results").exists()


def test_a_missing_container_stops_an_apptainer_run_before_any_job(tmp_path: Path) -> None:
    # TEST DOUBLE: Apptainer cannot be installed here; this stand-in only answers `--version`,
    # which is all Snakemake asks of it before the first job.
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    fake = bin_folder / "apptainer"
    fake.write_text("#!/bin/sh\necho 'apptainer version 1.3.4'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = write_config(tmp_path / "tiny.yaml", tiny_config(
        tmp_path, containers={"cpu": "images/cpu.sif", "cuda": "images/cuda.sif"}))
    environment = dict(os.environ, PATH=f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    dry = snakemake("-n", "--cores", "1", "--sdm", "apptainer", "--configfile", str(config),
                    cwd=tmp_path, env=environment)
    assert dry.returncode == 0, dry.stderr  # a dry run does not need the images
    result = snakemake("--cores", "1", "--sdm", "apptainer", "--configfile", str(config),
                       cwd=tmp_path, env=environment)
    assert result.returncode != 0
    assert "error: config key containers.cpu: images/cpu.sif does not exist" in result.stderr
    assert not (tmp_path / "results").exists()


def test_the_tiny_study_runs_end_to_end(tiny_study) -> None:
    folder: Path = tiny_study["study"]
    metrics = pd.read_parquet(folder / "tables" / "registration_metrics.parquet")
    assert set(metrics["arm"]) == {"fp64", "dynomp"}
    assert set(metrics["subject"]) == {"sub-01", "sub-02", "sub-03"}
    dice = metrics[metrics["metric"] == "dice_mean"].set_index(["subject", "arm"])["value"]
    assert len(dice) == 6 and dice.between(0.2, 1.0).all()
    runs = pd.read_parquet(folder / "tables" / "runs.parquet")
    assert len(runs) == 6 + 2 and set(runs["status"]) <= {"completed", "diverged"} | {
        status for status in runs["status"] if str(status).startswith("diverged at step")}
    trace = pd.read_parquet(folder / "tables" / "registration_trace.parquet")
    assert {"rigid", "affine", "syn"} <= set(trace["stage"])
    assert trace.loc[trace["arm"] == "dynomp", "pmin"].notna().any()
    learning = pd.read_parquet(folder / "tables" / "learning_trace.parquet")
    assert set(learning["arm"]) == {"fp32", "dynomp"} and learning["step"].max() == 4
    loss = pd.read_csv(folder / "stats" / "loss_difference.tsv", sep="\t")
    assert set(loss["arm"]) == {"dynomp"} and len(loss) == 6  # 3 stages x 2 levels
    for name in ("pmin_traces", "loss_curves", "registration_by_arm", "learning_by_arm"):
        assert (folder / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (folder / "figures" / f"{name}.svg").read_text()[:2000]
    brain = folder / "derivatives" / "dynomp" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    assert brain.is_file()


def test_rerunning_one_arm_schedules_only_it_and_the_report(tiny_study) -> None:
    for arm, prefix, count in (("dynomp", "register", 3), ("fp32", "train", 1)):
        result = snakemake("-n", "--cores", "2", "--configfile", str(tiny_study["config"]),
                           "--forcerun", rule_name(prefix, arm), cwd=tiny_study["root"])
        assert result.returncode == 0, result.stderr
        scheduled = {rule: n for rule, n in job_counts(result.stdout).items() if rule != "total"}
        expected = {rule_name(prefix, arm): count} | dict.fromkeys(REPORT_RULES, 1)
        if prefix == "train":
            expected[rule_name("evaluate", arm)] = 1
        assert scheduled == expected


def test_an_up_to_date_study_has_nothing_to_do(tiny_study) -> None:
    result = snakemake("-n", "--cores", "2", "--configfile", str(tiny_study["config"]),
                       cwd=tiny_study["root"])
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_the_report_holds_the_figures_and_statistics(tiny_study) -> None:
    report = tiny_study["root"] / "report.zip"
    result = snakemake("--cores", "1", "--configfile", str(tiny_study["config"]),
                       "--report", str(report), cwd=tiny_study["root"])
    assert result.returncode == 0, result.stderr
    import zipfile

    names = zipfile.ZipFile(report).namelist()
    for name in ("pmin_traces.png", "loss_curves.png", "registration_by_arm.png",
                 "loss_difference.tsv", "arm_comparison.tsv"):
        assert any(entry.endswith(name) for entry in names), name
    assert any(entry.endswith("report.html") for entry in names)


def test_shipped_configs_are_valid_yaml_with_a_study_name() -> None:
    for path in sorted((REPOSITORY / "configs").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["study"] == path.stem


def test_a_failing_job_leaves_no_partial_output(tmp_path: Path) -> None:
    broken = tmp_path / "broken-registration.yaml"
    broken.write_text("preset: quick\nstages: [{name: rigid, iterations: [2], shrink_factors: [8],"
                      " smoothing_sigmas: [1], metric: nmi}]\n")  # no such metric: the job fails
    config = tiny_config(
        tmp_path,
        data={"source": "embedded", "subjects": 1, "resolution": 6.0, "also": [],
              "labels": None},
        brain_extraction={"iterations": 100},
        registration={"arms": ["fp64"], "config": str(broken)},
        learning={"arms": []},
    )
    result = snakemake("--cores", "1", "--configfile", str(write_config(tmp_path / "s.yaml", config)),
                       cwd=tmp_path)
    assert result.returncode != 0
    study = tmp_path / "results" / "tiny"
    log = (study / "logs" / "registration" / "sub-01_fp64.log").read_text()
    assert log.strip().splitlines()[-1].startswith("dynomp register: error: ")
    assert "metric" in log.strip().splitlines()[-1]
    # the brain extraction before it is complete; the failed run's folder is gone entirely
    assert (study / "derivatives" / "dynomp" / "sub-01" / "anat" /
            "sub-01_desc-brain_T1w.nii.gz").is_file()
    assert not (study / "registration" / "sub-01" / "fp64").exists()
    assert not (study / "tables").exists()


def test_the_profiles_dry_run_without_a_cluster(tmp_path: Path) -> None:
    results = f"results={tmp_path / 'results'}"
    local = snakemake("-n", "--profile", str(REPOSITORY / "workflow" / "profiles" / "local"),
                      "--config", results)
    assert local.returncode == 0, local.stderr
    assert job_counts(local.stdout)["total"] == 44
    environment = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    installed = dynomp("profile", "install", "slurm", "--account", "lab", "--partition", "short",
                       "--no-apptainer", env=environment)
    assert installed.returncode == 0, installed.stderr
    slurm = snakemake("-n", "--profile", "slurm", "--config", results, env=environment)
    assert slurm.returncode == 0, slurm.stderr
    assert "Using profile slurm" in slurm.stdout + slurm.stderr
    assert job_counts(slurm.stdout)["total"] == 44
