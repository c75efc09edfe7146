"""dynomp.workflow: the study config's schema, defaults and checks, subject lists, rule names, profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynomp.cli import main
from dynomp.learning.strategies import STRATEGIES
from dynomp.registration.config import PRESETS
from dynomp.registration.precision import ARMS
from dynomp.workflow import (
    REGISTRATION_PRESETS,
    check_containers,
    discovered_subjects,
    install_profile,
    load_study_config,
    read_schema,
    render_profile,
    rule_name,
    subject_labels,
)
from tests.workflow.conftest import REPOSITORY

SCHEMA = REPOSITORY / "workflow" / "schemas" / "config.schema.yaml"


def study(name: str) -> dict:
    """A config file of the repository, as a dict."""
    return yaml.safe_load((REPOSITORY / "configs" / f"{name}.yaml").read_text())


def load(config: dict) -> dict:
    return load_study_config(config, schema=SCHEMA, workdir=REPOSITORY)


def test_the_schema_lists_exactly_the_arms_the_code_knows() -> None:
    properties = read_schema(SCHEMA)["properties"]
    assert properties["registration"]["properties"]["arms"]["items"]["enum"] == list(ARMS)
    assert properties["learning"]["properties"]["arms"]["items"]["enum"] == list(STRATEGIES)
    assert REGISTRATION_PRESETS == PRESETS


def test_the_default_study_loads_with_defaults_filled_in() -> None:
    loaded = load(study("default"))
    assert loaded["results"] == "results" and loaded["seed"] == 0
    assert loaded["registration"]["arms"] == ["ants-fp64", "fp64", "fp32", "bf16", "dynomp"]
    assert loaded["learning"]["arms"] == ["fp32", "amp", "amp-bf16", "bf16", "fp16", "dynomp"]
    assert loaded["brain_extraction"] == {"method": "bet", "fractional_threshold": 0.7,
                                          "iterations": 1000}
    assert loaded["registration"]["config"] == "quick"
    assert loaded["containers"] == {"cpu": "containers/dynomp-cpu.sif",
                                    "cuda": "containers/dynomp-cuda.sif"}
    assert subject_labels(loaded) == ["01", "02", "03", "04"]


def test_the_real_studies_load_and_leave_their_subjects_to_the_clone() -> None:
    corr = load(study("corr-bmb1"))
    assert corr["data"]["source"] == "///corr/RawDataBIDS/BMB_1" and corr["data"]["subjects"] == 50
    assert corr["template"] == {"name": "MNI152NLin2009cAsym", "resolution": 1, "labels": False}
    assert corr["registration"]["config"] == "paper"
    assert subject_labels(corr) is None
    oasis = load(study("oasis"))
    assert oasis["data"]["layout"] == "oasis" and oasis["learning"]["dims"] == [2, 3]
    assert oasis["registration"]["arms"] == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["registration"].update(speed=3),
         ("config key registration.speed: unknown key (known here: arms, config, device, mem_mb, "
          "runtime, threads)")),
        (lambda c: c.update(colour="red"), "config key colour: unknown key"),
        (lambda c: c["registration"].update(arms=["fp64", "fp8"]),
         ("config key registration.arms[1]: 'fp8' is not one of: fp64, fp32, bf16, fp16, dynomp, "
          "ants-fp64, ants-fp32")),
        (lambda c: c["learning"].update(arms=["amp", "tf32"]),
         "config key learning.arms[1]: 'tf32' is not one of: fp32, amp, amp-bf16, bf16, fp16, dynomp"),
        (lambda c: c["data"].update(subjects=0), "config key data.subjects: 0 is not valid"),
        (lambda c: c["registration"].update(threads="two"),
         "config key registration.threads: 'two' is not of type 'integer'"),
        (lambda c: c.pop("study"), "config key study: required"),
        (lambda c: c.update(data={"source": "/nonexistent/dataset", "subjects": ["01"],
                                  "also": ["derivatives/truth"]}),
         "config key data.source: /nonexistent/dataset does not exist (missing dataset"),
        (lambda c: c["report"].update(baseline="fp16"),
         "config key report.baseline: fp16 is not among registration.arms"),
        (lambda c: c["registration"].update(config="nowhere.yaml"),
         "config key registration.config: nowhere.yaml is neither a preset"),
        (lambda c: c["learning"].update(config="missing.yaml"),
         "config key learning.config: missing.yaml does not exist"),
        (lambda c: c["data"].update(also=[]), "config key data.also: learning on a BIDS dataset"),
        (lambda c: c["report"].update(sweep="results/no-sweep"),
         "config key report.sweep: results/no-sweep/sweep_metrics.parquet does not exist"),
        (lambda c: c["data"].update(subjects="all"),
         "config key data.subjects: the embedded source needs a count of subjects"),
        (lambda c: c["data"].update(layout="oasis"), "config key registration.arms: the oasis layout"),
    ],
)
def test_a_bad_config_fails_with_one_line_naming_the_key(change, message: str) -> None:
    config = study("default")
    change(config)
    with pytest.raises(ValueError) as error:
        load(config)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_resolution_is_refused_for_a_real_dataset(tmp_path: Path) -> None:
    config = study("corr-bmb1")
    config["data"]["resolution"] = 2.0
    with pytest.raises(ValueError, match="^config key data.resolution: only for the embedded"):
        load(config)


def test_containers_are_checked_only_for_what_the_study_runs(tmp_path: Path) -> None:
    config = load(study("corr-bmb1"))  # registration on cuda: both images
    (tmp_path / "cpu.sif").write_bytes(b"image")
    config["containers"] = {"cpu": "cpu.sif", "cuda": "cuda.sif"}
    with pytest.raises(ValueError, match=r"^config key containers.cuda: cuda.sif does not exist"):
        check_containers(config, workdir=tmp_path)
    config["registration"]["device"] = "cpu"
    check_containers(config, workdir=tmp_path)  # the CUDA image is not needed any more
    config["containers"]["cpu"] = "docker://python:3.11"  # a URI is left to Apptainer
    check_containers(config, workdir=tmp_path)


def test_subjects_of_a_clone_are_sorted_and_cut(tmp_path: Path) -> None:
    for label in ("0003", "0001", "0002"):
        (tmp_path / f"sub-{label}").mkdir()
    (tmp_path / "sub-notes.txt").write_text("not a subject folder")
    assert discovered_subjects(tmp_path, subjects="all") == ["0001", "0002", "0003"]
    assert discovered_subjects(tmp_path, subjects=2) == ["0001", "0002"]
    with pytest.raises(ValueError, match="asks for 5, the dataset has 3"):
        discovered_subjects(tmp_path, subjects=5)
    with pytest.raises(ValueError, match="no sub-\\* folder"):
        discovered_subjects(tmp_path / "sub-0001", subjects="all")


def test_listed_subjects_lose_their_prefix() -> None:
    config = load(study("corr-bmb1"))
    config["data"]["subjects"] = ["sub-0025", "0026"]
    assert subject_labels(config) == ["0025", "0026"]


def test_rule_names_are_identifiers() -> None:
    assert rule_name("register", "ants-fp64") == "register_ants_fp64"
    assert rule_name("train", "amp-bf16") == "train_amp_bf16"


def test_the_slurm_profile_gets_account_partition_apptainer_and_gpus(tmp_path: Path) -> None:
    profile = yaml.safe_load(render_profile("slurm", account="lab42", partition="gpu"))
    assert profile["executor"] == "slurm"
    assert profile["default-resources"]["slurm_account"] == "lab42"
    assert profile["default-resources"]["slurm_partition"] == "gpu"
    assert profile["software-deployment-method"] == "apptainer"
    assert "--nv" in profile["apptainer-args"]
    learning_rules = {rule_name(prefix, arm) for prefix in ("train", "evaluate") for arm in STRATEGIES}
    assert learning_rules <= set(profile["set-resources"])
    assert all(profile["set-resources"][name]["gpu"] == 1 for name in learning_rules)
    for name in learning_rules | {rule_name("register", arm) for arm in ARMS}:
        assert {"runtime", "mem_mb"} <= set(profile["set-resources"][name])
    bare = yaml.safe_load(render_profile("slurm", account="a", partition="p", apptainer=False,
                                         gpu=False))
    assert "software-deployment-method" not in bare and "apptainer-args" not in bare
    assert not any("gpu" in resources for resources in bare["set-resources"].values())
    with pytest.raises(ValueError, match="--account and --partition are required"):
        render_profile("slurm", account=None, partition="p")
    with pytest.raises(ValueError, match="unknown profile 'pbs'"):
        render_profile("pbs", account="a", partition="p")


def test_profile_install_writes_where_snakemake_looks(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code = main(["profile", "install", "slurm", "--account", "lab42", "--partition", "short"])
    assert code == 0
    written = tmp_path / "config" / "snakemake" / "slurm" / "config.yaml"
    assert f"wrote {written}" in capsys.readouterr().out
    assert yaml.safe_load(written.read_text())["default-resources"]["slurm_partition"] == "short"
    assert main(["profile", "install", "slurm", "--account", "x", "--partition", "y"]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    path = install_profile("slurm", account="x", partition="y", force=True)
    assert yaml.safe_load(path.read_text())["default-resources"]["slurm_account"] == "x"
