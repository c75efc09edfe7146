"""The tiny study on a real Slurm, through `dynomp profile install slurm` and `snakemake --profile slurm`.

Slurm runs here for real (workflow/scripts/local-slurm.sh, through the `local_slurm` fixture); only
Apptainer cannot, so the profile is installed with --no-apptainer (and --no-gpu: no GPU here).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

from dynomp.workflow import rule_name
from tests.workflow.conftest import dynomp, job_counts, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slurm

LOCAL_RULES = {"fetch", "template", "run_lists", "all"}


def test_the_tiny_study_runs_with_the_slurm_executor(local_slurm, tmp_path: Path) -> None:
    environment = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    installed = dynomp("profile", "install", "slurm", "--account", local_slurm.account,
                       "--partition", local_slurm.partition, "--no-apptainer", "--no-gpu",
                       env=environment)
    assert installed.returncode == 0, installed.stderr
    profile = tmp_path / "config" / "snakemake" / "slurm" / "config.yaml"
    assert profile.is_file()

    config = tiny_config(tmp_path, study="tiny-slurm")
    config["learning"]["arms"] = ["fp32"]
    config_path = write_config(tmp_path / "study.yaml", config)
    rules = ["cohort", "brain_extraction", "tables", "stats", "figures",
             *(rule_name("register", arm) for arm in config["registration"]["arms"]),
             *(rule_name(kind, arm) for kind in ("train", "evaluate")
               for arm in config["learning"]["arms"])]
    # the profile asks for cluster-sized memory; this node has a few GB, so ask for less
    small = [f"{rule}:mem_mb=1500" for rule in rules] + [f"{rule}:runtime=30" for rule in rules]
    # the executor waits 40 s before its first status check by default; these jobs take seconds
    result = snakemake("--profile", "slurm", "--configfile", str(config_path),
                       "--slurm-init-seconds-before-status-checks", "3",
                       "--set-resources", *small, cwd=tmp_path, env=environment)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    output = result.stdout + result.stderr
    job_ids = re.findall(r"SLURM jobid (\d+)", output)
    cluster_jobs = sum(count for rule, count in job_counts_all(output).items()
                       if rule not in LOCAL_RULES | {"total"})
    # cohort 1, brain extraction 3, registration 3 x 2, train + evaluate 2, tables, stats, figures 3
    assert len(job_ids) == cluster_jobs == 15
    records = local_slurm.sacct_records(job_ids)
    assert {state for state, _ in records.values()} == {"COMPLETED"}, records
    assert {exit_code for _, exit_code in records.values()} == {"0:0"}

    study = tmp_path / "results" / "tiny-slurm"
    metrics = pd.read_parquet(study / "tables" / "registration_metrics.parquet")
    assert set(metrics["arm"]) == {"fp64", "dynomp"} and set(metrics["subject"]) == {"sub-01", "sub-02", "sub-03"}
    assert (study / "stats" / "loss_difference.tsv").is_file()
    assert (study / "figures" / "pmin_traces.svg").is_file()


def job_counts_all(output: str) -> dict[str, int]:
    """The first 'Job stats' table in the output: the jobs of the whole run (before the checkpoint
    updates the DAG, Snakemake prints a second table for the jobs it added)."""
    tables = output.split("Job stats:")[1:]
    counts: dict[str, int] = {}
    for table in tables:
        for rule, count in job_counts("Job stats:" + table).items():
            if rule != "total":
                counts[rule] = max(counts.get(rule, 0), count)
    return counts
