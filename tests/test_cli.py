"""The `dynomp` command: formats table, one-line errors, and the demo's outputs."""

import json

import pandas as pd
import pytest

from dynomp.cli import main


def test_formats_table_lists_every_format_with_its_numbers(capsys):
    assert main(["formats", "--device", "cuda"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"fp64", "fp32", "fp24", "tf32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2"}
    assert rows["fp16"][1:4] == ["11", "5", "16"] and rows["fp16"][4] == "65504"
    assert rows["bf16"][-1] == "yes" and rows["fp24"][-1] == "no"


def test_bad_argument_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "dynomp demo: error: --steps: need at least 2, got 1"


def test_unknown_command_is_rejected():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_demo_writes_trace_and_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "40", "--stages", "precision"]) == 0
    assert str(tmp_path.resolve()) in capsys.readouterr().out
    trace = pd.read_parquet(tmp_path / "precision" / "trace.parquet")
    assert len(trace) == 80 and set(trace["arm"]) == {"fp32", "dynomp"}
    assert {"pmin", "pmin_smoothed", "format", "loss", "seconds"} <= set(trace.columns)
    assert set(trace.loc[trace.arm == "fp32", "format"]) == {"fp32"}
    dynomp = trace[trace.arm == "dynomp"]
    assert dynomp["format"].nunique() >= 2  # it changed format at least once
    summary = json.loads((tmp_path / "precision" / "summary.json").read_text())
    assert sum(summary["dynomp"]["steps_per_format"].values()) == 40
    assert summary["fp32"]["test_accuracy"] > 0.8
    assert abs(summary["dynomp"]["test_accuracy"] - summary["fp32"]["test_accuracy"]) < 0.05


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(tmp_path), "--stages", "precision"]) == 2
    assert "not empty and was not made by dynomp demo" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_cohort(tmp_path, capsys):
    arguments = ["demo", "--out", str(tmp_path), "--stages", "data,registration,learning",
                 "--subjects", "3", "--registered-subjects", "1", "--resolution", "4",
                 "--registration-arms", "fp32,dynomp", "--learning-arms", "fp32,dynomp",
                 "--learning-steps", "4"]
    assert main(arguments) == 0
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert list(summary["arm"]) == ["fp32", "dynomp", "fp32", "dynomp"]
    assert set(summary["status"]) == {"completed"}
    registration = summary[summary["stage"] == "registration"]
    assert (registration["dice_mean"] > 0.5).all()  # brains on the template, six labels
    assert abs(registration["dice_mean"].iloc[0] - registration["dice_mean"].iloc[1]) < 0.01
    metrics = json.loads((tmp_path / "registration" / "sub-01" / "dynomp" / "metrics.json").read_text())
    assert metrics["arm"] == "dynomp" and "fp32" in metrics["seconds_by_format"]
    mask = tmp_path / "data" / "derivatives" / "dynomp" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    assert mask.is_file()
    assert (tmp_path / "learning" / "dynomp" / "evaluation.parquet").is_file()
    # a second run replaces the first
    assert main(arguments[:3] + ["--stages", "precision", "--steps", "4"]) == 0
    assert not (tmp_path / "registration").exists()
