"""`dynomp tables` on a study written by the real registration and training code."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dynomp.cli import main
from dynomp.report.tables import SCHEMAS, TABLE_NAMES, build_tables, write_tables

from .conftest import DIVERGING_RUN, LEARNING_RUNS, LEARNING_STEPS, REGISTRATION_ARMS, SUBJECTS

ENGINE_SCALARS = {
    "dice_mean", "jaccard_mean", "ncc", "nmi", "jacobian_nonpositive_percent", "sd_log_jacobian",
    "wall_seconds", "baseline_rss_bytes", "peak_rss_bytes", "peak_gpu_bytes",
    "peak_child_rss_bytes",
}
STAGE_LEVELS = {"rigid/0", "rigid/1", "affine/0", "affine/1", "syn/0", "syn/1"}
LEARNING_SCALARS = {"steps_done", "final_loss_total", "mean_step_seconds", "steps_per_second",
                    "peak_memory_bytes", "format_changes"}


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    return error


def test_tables_command_reads_a_list_file_and_writes_every_table(study, tmp_path, capsys):
    listing = tmp_path / "registration_runs.txt"
    # one run per line, as the workflow writes it; a trailing blank line is no argument
    listing.write_text("".join(f"{run}\n" for run in study["registration_runs"]) + "\n")
    out = tmp_path / "tables"
    arguments = ["tables", "--out", str(out), "--registration", f"@{listing}",
                 "--learning", *map(str, study["learning_runs"])]
    assert main(arguments) == 0
    counts = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert counts["runs"] == str(len(study["registration_runs"]) + len(LEARNING_RUNS)) == "14"
    for name in TABLE_NAMES:
        parquet = pd.read_parquet(out / f"{name}.parquet")
        tsv = pd.read_csv(out / f"{name}.tsv", sep="\t", na_values="n/a", keep_default_na=False)
        assert list(parquet.columns)[: len(SCHEMAS[name])] == list(SCHEMAS[name])
        assert list(tsv.columns) == list(parquet.columns)
        assert len(parquet) == len(tsv) == int(counts[name])
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


def test_registration_metrics_hold_every_number_of_each_metrics_json(study, study_tables):
    table = pd.read_parquet(study_tables / "registration_metrics.parquet")
    expected_rows = 0
    for run in study["registration_runs"]:
        metrics = _metrics(run)
        subject, arm = run.parent.name, run.name
        rows = table[(table.subject == subject) & (table.arm == arm)]
        assert set(rows.status) == {metrics["status"]}
        scalars = rows[rows.label == ""].set_index("metric").value
        assert set(scalars.index) == ENGINE_SCALARS
        for key in ENGINE_SCALARS:
            if metrics[key] is None:
                assert math.isnan(scalars[key])  # peak_gpu_bytes on CPU
            else:
                assert scalars[key] == pytest.approx(metrics[key], rel=1e-12)
        by_label = rows[rows.label != ""]
        for metric, key in (("dice", "dice"), ("jaccard", "jaccard"),
                            ("seconds_in_format", "seconds_by_format"),
                            ("final_loss", "final_losses")):
            values = by_label[by_label.metric == metric].set_index("label").value.to_dict()
            assert values == pytest.approx(metrics[key], rel=1e-12)
        assert set(by_label.metric) <= {"dice", "jaccard", "seconds_in_format", "final_loss"}
        if (subject, arm) == DIVERGING_RUN:
            assert metrics["status"] == "diverged" and metrics["final_losses"] == {}
        else:
            assert set(metrics["final_losses"]) == STAGE_LEVELS
            allowed = {"bf16", "fp16", "fp32", "fp64"} if arm == "dynomp" else {arm}
            assert metrics["seconds_by_format"] and set(metrics["seconds_by_format"]) <= allowed
        expected_rows += (len(ENGINE_SCALARS) + 2 * 2 + len(metrics["final_losses"])
                          + len(metrics["seconds_by_format"]))
    assert len(table) == expected_rows
    # settings and provenance are not observations
    assert not set(table.metric) & {"threads", "arm", "status", "device", "warp_dtype"}


def test_registration_trace_is_each_trace_with_subject_and_arm(study, study_tables):
    table = pd.read_parquet(study_tables / "registration_trace.parquet")
    total = 0
    for run in study["registration_runs"]:
        trace = pd.read_parquet(run / "trace.parquet")
        total += len(trace)
        rows = table[(table.subject == run.parent.name) & (table.arm == run.name)]
        rows = rows.drop(columns=["subject", "arm"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, trace, check_dtype=False)
    assert len(table) == total and total > 0
    assert set(table.subject) == set(SUBJECTS)
    # the diverged fp16 run stopped at its first iteration: no trace rows
    assert table[table.arm == "fp16"].empty


def test_runs_table_says_where_each_run_diverged(study, study_tables):
    runs = pd.read_parquet(study_tables / "runs.parquet")
    registration = runs[runs.kind == "registration"].set_index(["subject", "arm"])
    assert len(registration) == len(SUBJECTS) * len(REGISTRATION_ARMS) + 1
    diverged = registration.loc[DIVERGING_RUN]
    assert diverged.status == "diverged"
    assert (diverged.diverged_stage, diverged.diverged_level, diverged.diverged_iteration) == (
        "rigid", 0.0, 0.0)
    completed = registration.drop(DIVERGING_RUN)
    assert (completed.status == "completed").all()
    assert completed.diverged_stage.isna().all() and completed.diverged_iteration.isna().all()
    assert set(registration.xs("dynomp", level="arm").formats) == {"bf16,fp16,fp32,fp64"}
    assert set(registration.xs("fp32", level="arm").formats) == {"fp32"}
    assert registration.dim.isna().all()
    learning = runs[runs.kind == "learning"].set_index(["dim", "arm"])
    assert list(learning.index) == [(2, "fp32"), (2, "dynomp"), (2, "fp16"), (3, "fp32")]
    assert set(learning.subject) == {""} and set(learning.task) == {"registration"}
    assert learning.loc[(2, "fp16"), "status"] == "diverged at step 2"
    assert learning.loc[(2, "fp16"), "diverged_step"] == 2.0
    assert learning.drop((2, "fp16")).diverged_step.isna().all()
    assert learning.loc[(2, "dynomp"), "formats"] == "bf16,fp16,fp32"
    assert learning.loc[(3, "fp32"), "formats"] == "fp32"
    assert runs.run.tolist() == [str(run) for run in study["registration_runs"]
                                 + study["learning_runs"]]


def test_learning_tables(study, study_tables):
    # two runs share the arm fp32 (2-D and 3-D): every learning table tells them apart by run
    metrics = pd.read_parquet(study_tables / "learning_metrics.parquet")
    trace = pd.read_parquet(study_tables / "learning_trace.parquet")
    evaluation = pd.read_parquet(study_tables / "learning_evaluation.parquet")
    for run, (dim, arm) in zip(study["learning_runs"], LEARNING_RUNS, strict=True):
        recorded = _metrics(run)
        rows = metrics[metrics.run == str(run)]
        assert set(rows.metric) == LEARNING_SCALARS
        assert set(rows.status) == {recorded["status"]} and set(rows.task) == {"registration"}
        assert set(rows.arm) == {arm} and set(rows.dim) == {int(dim[0])}
        for metric, value in zip(rows.metric, rows.value, strict=True):
            assert value == pytest.approx(recorded[metric], rel=1e-12)
        original = pd.read_parquet(run / "trace.parquet")
        mine = trace[trace.run == str(run)]
        assert set(mine.arm) == {arm} and set(mine.dim) == {int(dim[0])}
        mine = mine.drop(columns=["arm", "task", "dim", "run"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, original, check_dtype=False)
        assert len(original) == (2 if arm == "fp16" else LEARNING_STEPS)
        original = pd.read_parquet(run / "evaluation.parquet")
        mine = evaluation[evaluation.run == str(run)]
        assert set(mine.dim) <= {int(dim[0])} and set(mine.task) <= {"registration"}
        mine = mine.drop(columns=["task", "dim", "run"]).reset_index(drop=True)
        if arm == "fp16":
            # the diverged run's evaluation table is empty: it adds no rows
            assert original.empty and mine.empty
        else:
            pd.testing.assert_frame_equal(mine, original, check_dtype=False)
    # (2-D fp32, 2-D dynomp, 3-D fp32) x 2 held-out pairs x (2 labels + 4 measures)
    assert len(evaluation) == 3 * 2 * (2 + 4)


def test_no_input_gives_every_table_empty_with_its_columns(tmp_path, capsys):
    assert main(["tables", "--out", str(tmp_path)]) == 0
    for name in TABLE_NAMES:
        table = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert table.empty and list(table.columns) == list(SCHEMAS[name])
        tsv = (tmp_path / f"{name}.tsv").read_text()
        assert tsv == "\t".join(SCHEMAS[name]) + "\n"
    assert pd.read_parquet(tmp_path / "registration_metrics.parquet").value.dtype == "float64"


def test_sweep_metrics_are_copied_with_their_parameter_columns(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    table = pd.DataFrame({"run": ["w3", "w3", "w5"], "window": [3, 3, 5],
                          "metric": ["dice_mean", "wall_seconds", "dice_mean"],
                          "value": [0.81, 12.5, 0.82]})
    table.to_parquet(sweep / "sweep_metrics.parquet", index=False)
    tables = write_tables(out=tmp_path / "tables", sweep=sweep)
    copied = pd.read_parquet(tmp_path / "tables" / "sweep_metrics.parquet")
    assert list(copied.columns) == ["run", "metric", "value", "window"]
    assert copied.value.tolist() == [0.81, 12.5, 0.82] and copied.window.tolist() == [3, 3, 5]
    assert len(tables["sweep_metrics"]) == 3
    assert main(["tables", "--out", str(tmp_path / "t2"), "--sweep", str(tmp_path)]) == 2
    assert f"{tmp_path / 'sweep_metrics.parquet'}: not found" in _one_line_error(capsys)


def test_subject_from_a_subject_key_or_the_sub_folder(study, tmp_path, capsys):
    source = study["registration_runs"][0]
    elsewhere = tmp_path / "anywhere" / "fp64"
    shutil.copytree(source, elsewhere)
    assert main(["tables", "--out", str(tmp_path / "t"), "--registration", str(elsewhere)]) == 2
    error = _one_line_error(capsys)
    assert str(elsewhere) in error and "parent folder 'anywhere' is not sub-<label>" in error
    metrics = _metrics(elsewhere)
    metrics["subject"] = "07"
    (elsewhere / "metrics.json").write_text(json.dumps(metrics))
    tables = build_tables(registration_runs=[elsewhere])
    assert set(tables["registration_metrics"].subject) == {"sub-07"}
    assert tables["runs"].subject.tolist() == ["sub-07"]


@pytest.mark.parametrize("problem", ["missing", "duplicate", "no arm", "not json"])
def test_bad_runs_are_one_line_errors_naming_the_run(study, tmp_path, capsys, problem):
    run = tmp_path / "registration" / "sub-09" / "fp64"
    shutil.copytree(study["registration_runs"][0], run)
    runs = [run]
    expected = ""
    if problem == "missing":
        (run / "metrics.json").unlink()
        expected = f"{run}: no metrics.json in this run directory"
    elif problem == "duplicate":
        runs = [run, run]
        expected = f"{run}: sub-09 arm fp64 is already given by {run}"
    elif problem == "no arm":
        metrics = _metrics(run)
        del metrics["arm"]
        (run / "metrics.json").write_text(json.dumps(metrics))
        expected = f"{run / 'metrics.json'}: no 'arm' key"
    else:
        (run / "metrics.json").write_text("{not json")
        expected = f"{run / 'metrics.json'}: not valid JSON"
    out = tmp_path / "tables"
    assert main(["tables", "--out", str(out), "--registration", *map(str, runs)]) == 2
    assert expected in _one_line_error(capsys)
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("name", ["metrics.json", "status.json", "trace.parquet"])
def test_a_learning_run_without_its_files_is_an_error(study, tmp_path, capsys, name):
    run = tmp_path / "learning" / "2d" / "fp32"
    shutil.copytree(study["learning_runs"][0], run)
    (run / name).unlink()
    assert main(["tables", "--out", str(tmp_path / "t"), "--learning", str(run)]) == 2
    assert _one_line_error(capsys).endswith(f"{run}: no {name} in this run directory")


def test_tsv_keeps_missing_values_empty_strings_and_awkward_text(tmp_path):
    from dynomp.report.tables import write_table

    frame = pd.DataFrame({
        "text": pd.array(["plain", "", None, "with space"], dtype="string"),
        "value": [1.5, math.nan, -2e-20, 3.0],
        "count": pd.array([1, None, 3, 4], dtype="Int64"),
    })
    write_table(frame, out=tmp_path, name="plain")
    assert (tmp_path / "plain.tsv").read_text().splitlines() == [
        "text\tvalue\tcount", "plain\t1.5\t1", "\tn/a\tn/a", "n/a\t-2e-20\t3", "with space\t3\t4"]
    awkward = frame.assign(text=pd.array(["tab\there", 'quote"d', "new\nline", "ok"],
                                         dtype="string"))
    write_table(awkward, out=tmp_path, name="awkward")
    back = pd.read_csv(tmp_path / "awkward.tsv", sep="\t", na_values="n/a", keep_default_na=False)
    assert back.text.tolist() == ["tab\there", 'quote"d', "new\nline", "ok"]
    assert back.value.tolist()[::2] == [1.5, -2e-20] and math.isnan(back.value[1])
