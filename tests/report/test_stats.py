"""`dynomp stats`: the numbers against hand computations on made tables, then on the real study."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from dynomp.cli import main
from dynomp.report.stats import (
    compute_stats,
    final_loss,
    relative_loss_difference,
    relative_loss_differences,
)
from dynomp.report.tables import SCHEMAS, empty_table, typed, write_table

from .conftest import DIVERGING_RUN, SUBJECTS

ALPHA = 0.05
SUBJECTS_MADE = ("sub-01", "sub-02", "sub-03", "sub-04")
BASELINE_FINAL = {("rigid", 0): -0.50, ("rigid", 1): -0.62, ("syn", 0): -0.91, ("syn", 1): -0.95}
# the relative final-loss difference of dynomp vs fp64, per stage x level and subject
DIFFERENCES = {
    ("rigid", 0): [0.010, 0.012, 0.011, 0.013],
    ("rigid", 1): [0.001, -0.002, 0.0005, 0.0],
    ("syn", 0): [0.004, 0.006, 0.003, math.nan],  # sub-04 diverged at syn/0, iteration 1
    ("syn", 1): [-0.002, 0.001, 0.0025, math.nan],
}
DIVERGED = ("sub-04", "dynomp", "syn", 0, 1)


def _trace_rows(subject: str, arm: str, finals: dict, *, stop: tuple | None = None) -> list[dict]:
    """Three iterations per stage x level ending at the given final loss (earlier ones higher)."""
    rows = []
    for (stage, level), last in finals.items():
        for iteration in range(3):
            if stop is not None and _after(stage, level, iteration, stop):
                return rows
            loss = last + 0.1 * (2 - iteration)
            rows.append({"subject": subject, "arm": arm, "stage": stage, "level": level,
                         "iteration": iteration, "loss": loss, "pmin": 5.0, "pmin_smoothed": 5.0,
                         "format": "fp64", "seconds": 0.01})
    return rows


def _after(stage: str, level: int, iteration: int, stop: tuple) -> bool:
    order = {"rigid": 0, "affine": 1, "syn": 2}
    return (order[stage], level, iteration) >= (order[stop[0]], stop[1], stop[2])


def _run_row(subject: str, arm: str, status: str = "completed",
             where: tuple = (None, math.nan, math.nan)) -> dict:
    return {"kind": "registration", "subject": subject, "arm": arm, "task": "", "dim": None,
            "status": status,
            "diverged_stage": where[0], "diverged_level": where[1], "diverged_iteration": where[2],
            "diverged_step": math.nan, "formats": arm, "run": f"registration/{subject}/{arm}"}


def _metric_rows(subject: str, arm: str, status: str, values: dict[str, float]) -> list[dict]:
    return [{"subject": subject, "arm": arm, "status": status, "metric": metric, "label": "",
             "value": value} for metric, value in values.items()]


DICE = {"fp64": [0.80, 0.82, 0.78, 0.81], "dynomp": [0.79, 0.835, 0.772, 0.30],
        "fp32": [0.801, 0.818, 0.781, 0.812]}
WALL = {"fp64": [10.0, 12.0, 11.0, 13.0], "dynomp": [6.0, 7.5, 6.2, 1.0],
        "fp32": [8.0, 9.0, 8.5, 9.9]}


@pytest.fixture
def made_tables(tmp_path: Path) -> Path:
    """Tables with known final losses, Dice and times, and a learning part with known traces."""
    trace, runs, metrics = [], [], []
    for index, subject in enumerate(SUBJECTS_MADE):
        trace += _trace_rows(subject, "fp64", BASELINE_FINAL)
        finals = {key: base + DIFFERENCES[key][index] * abs(base)
                  for key, base in BASELINE_FINAL.items()}
        diverged = subject == DIVERGED[0]
        if diverged:
            # the run diverged at syn/0 iteration 1: syn/0 has one finite iteration, syn/1 none
            trace += _trace_rows(subject, "dynomp", finals, stop=("syn", 0, 1))
        else:
            trace += _trace_rows(subject, "dynomp", finals)
        runs.append(_run_row(subject, "fp64"))
        runs.append(_run_row(subject, "dynomp", "diverged", ("syn", 0.0, 1.0)) if diverged
                    else _run_row(subject, "dynomp"))
        runs.append(_run_row(subject, "fp32"))
        for arm in ("fp64", "dynomp", "fp32"):
            status = "diverged" if diverged and arm == "dynomp" else "completed"
            metrics += _metric_rows(subject, arm, status, {
                "dice_mean": DICE[arm][index], "wall_seconds": WALL[arm][index],
                "jacobian_nonpositive_percent": 0.0})
    # ANTs arms: their losses are compared with ants-fp64, not with the engine's fp64
    for subject, ants64, ants32 in (("sub-01", -0.40, -0.41), ("sub-02", -0.44, -0.43)):
        trace += _trace_rows(subject, "ants-fp64", {("rigid", 0): ants64})
        trace += _trace_rows(subject, "ants-fp32", {("rigid", 0): ants32})
        runs += [_run_row(subject, "ants-fp64"), _run_row(subject, "ants-fp32")]
    # one subject only at rigid/1: n = 1, no test
    trace += _trace_rows("sub-01", "ants-fp64", {("rigid", 1): -0.5})
    trace += _trace_rows("sub-01", "ants-fp32", {("rigid", 1): -0.6})
    rng = np.random.default_rng(0)
    trace = pd.DataFrame(trace).sample(frac=1.0, random_state=1)  # row order must not matter
    learning_trace, evaluation, learning_metrics = [], [], []
    # (arm, task, dim): steps' formats; fp32 trains in 2-D and in 3-D, two runs of one arm
    formats = {("fp32", "registration", 2): ["fp32"] * 20,
               ("fp32", "registration", 3): ["fp32"] * 10,
               ("dynomp", "registration", 2): ["fp32"] * 10 + ["bf16"] * 6 + ["fp16"] * 4,
               ("amp", "registration", 2): ["fp16"] * 5,
               ("fp32", "classification", None): ["fp32"]}
    for (arm, task, dim), steps in formats.items():
        run = f"learning/{dim}d/{arm}" if dim else f"learning/{task}/{arm}"
        losses = 1.0 / np.arange(1, len(steps) + 1) + rng.uniform(0, 0.01, len(steps))
        if arm == "amp":
            losses[-1] = math.nan  # diverged at step 5
        learning_trace += [{"arm": arm, "task": task, "dim": dim, "step": step + 1,
                            "loss_total": losses[step], "format": fmt, "run": run}
                           for step, fmt in enumerate(steps)]
        runs.append({"kind": "learning", "subject": "", "arm": arm, "task": task, "dim": dim,
                     "status": "diverged at step 5" if arm == "amp" else "completed",
                     "diverged_stage": None, "diverged_level": math.nan,
                     "diverged_iteration": math.nan,
                     "diverged_step": 5.0 if arm == "amp" else math.nan, "formats": arm,
                     "run": run})
        learning_metrics.append({"arm": arm, "task": task, "dim": dim, "status": "completed",
                                 "metric": "final_loss_total", "value": losses[-1], "run": run})
        if task == "classification":
            learning_metrics.append({**learning_metrics[-1], "metric": "held_out_accuracy",
                                     "value": 0.93})
        if (arm, dim) == ("fp32", 2):
            # pair A has two labels (mean 0.7), pair B one (0.9): the per-pair mean is 0.8
            evaluation += [
                ("fp32", "sub-05", "sub-06", "dice", 1, 0.8, task, dim, run),
                ("fp32", "sub-05", "sub-06", "dice", 2, 0.6, task, dim, run),
                ("fp32", "sub-06", "sub-05", "dice", 1, 0.9, task, dim, run),
                ("fp32", "sub-05", "sub-06", "jacobian_nonpositive_percent", None, 0.5, task,
                 dim, run),
                ("fp32", "sub-06", "sub-05", "jacobian_nonpositive_percent", None, 1.5, task,
                 dim, run),
            ]
        if (arm, dim) == ("fp32", 3):
            evaluation += [("fp32", "sub-05", "sub-06", "dice", 1, 0.5, task, dim, run)]
    learning_trace = pd.DataFrame(learning_trace)
    for column in SCHEMAS["learning_trace"]:
        if column not in learning_trace:
            is_text = SCHEMAS["learning_trace"][column] == "string"
            learning_trace[column] = "" if is_text else math.nan
    evaluation = pd.DataFrame(evaluation, columns=list(SCHEMAS["learning_evaluation"]))
    learning_metrics = pd.DataFrame(learning_metrics)
    tables = {
        "registration_trace": trace, "runs": pd.DataFrame(runs),
        "registration_metrics": pd.DataFrame(metrics), "learning_trace": learning_trace,
        "learning_evaluation": evaluation, "learning_metrics": learning_metrics,
    }
    out = tmp_path / "tables"
    for name in SCHEMAS:
        frame = typed(tables[name], name) if name in tables else empty_table(name)
        write_table(frame, out=out, name=name)
    return out


def _bonferroni_ci(values: list[float], comparisons: int) -> tuple[float, float, float, float]:
    """Closed forms: t, one-sided p, and the two-sided CI at 1 - alpha/comparisons."""
    values = np.asarray(values)
    n = len(values)
    mean, sd = values.mean(), values.std(ddof=1)
    standard_error = sd / math.sqrt(n)
    t = mean / standard_error
    p = scipy_stats.t.sf(t, n - 1)
    quantile = scipy_stats.t.ppf(1 - ALPHA / (2 * comparisons), n - 1)
    return t, p, mean - quantile * standard_error, mean + quantile * standard_error


def test_loss_difference_matches_the_hand_computation(made_tables):
    table = compute_stats(tables=made_tables, alpha=ALPHA)["loss_difference"]
    dynomp = table[table.arm == "dynomp"].set_index(["stage", "level"])
    assert list(dynomp.index) == list(DIFFERENCES)  # stages in pipeline order
    assert set(dynomp.baseline) == {"fp64"} and set(dynomp.comparisons) == {4}
    for key, differences in DIFFERENCES.items():
        row = dynomp.loc[key]
        kept = [d for d in differences if not math.isnan(d)]
        t, p, low, high = _bonferroni_ci(kept, 4)
        assert row.n == len(kept) and row.df == len(kept) - 1
        assert row.n_diverged == (1 if key[0] == "syn" else 0)
        assert row["mean"] == pytest.approx(np.mean(kept), rel=1e-9)
        assert row.sd == pytest.approx(np.std(kept, ddof=1), rel=1e-7)
        assert row.t == pytest.approx(t, rel=1e-7)
        assert row.p_value == pytest.approx(p, rel=1e-6)
        assert row.p_bonferroni == pytest.approx(min(1.0, 4 * p), rel=1e-6)
        assert row.ci_level == pytest.approx(1 - ALPHA / 4)
        assert (row.ci_low, row.ci_high) == (pytest.approx(low, rel=1e-6),
                                             pytest.approx(high, rel=1e-6))
    # rigid/0 degrades clearly: t = 17.8, p = 1.9e-4, p x 4 = 7.7e-4; rigid/1 does not (p = 0.57)
    assert dynomp.loc[("rigid", 0)].t == pytest.approx(17.8157, rel=1e-5)
    assert dynomp.loc[("rigid", 0)].p_bonferroni == pytest.approx(7.7123e-4, rel=1e-4)
    assert dynomp.loc[("rigid", 1)].p_value == pytest.approx(0.56932, rel=1e-4)
    assert dynomp.loc[("rigid", 1)].p_bonferroni == 1.0
    # fp32 has runs but no trace rows: a row per stage x level with n = 0 and no test
    fp32 = table[table.arm == "fp32"]
    assert len(fp32) == 4 and fp32.n.eq(0).all() and fp32.p_value.isna().all()


def test_ants_arms_are_compared_with_ants_at_the_baseline_precision(made_tables):
    table = compute_stats(tables=made_tables, alpha=ALPHA)["loss_difference"]
    ants = table[table.arm == "ants-fp32"].set_index(["stage", "level"])
    assert "ants-fp64" not in set(table.arm)
    assert set(ants.baseline) == {"ants-fp64"}
    differences = [(-0.41 + 0.40) / 0.40, (-0.43 + 0.44) / 0.44]
    t, p, low, high = _bonferroni_ci(differences, 1)
    row = ants.loc[("rigid", 0)]
    assert row.n == 2 and row.comparisons == 1
    assert (row.t, row.p_value, row.p_bonferroni) == (pytest.approx(t), pytest.approx(p),
                                                      pytest.approx(p))
    assert (row.ci_low, row.ci_high) == (pytest.approx(low), pytest.approx(high))
    single = ants.loc[("rigid", 1)]
    assert single.n == 1 and single["mean"] == pytest.approx(-0.2)
    assert all(math.isnan(single[c]) for c in ("sd", "t", "p_value", "p_bonferroni", "ci_low"))


def test_arm_restricts_the_loss_difference(made_tables):
    table = compute_stats(tables=made_tables, arms=["ants-fp32"])["loss_difference"]
    assert set(table.arm) == {"ants-fp32"}


def test_arm_comparison_matches_scipy_on_the_same_numbers(made_tables):
    table = compute_stats(tables=made_tables)["arm_comparison"].set_index(["metric", "arm"])
    # four comparisons have a p-value: (dice, wall) x (dynomp, fp32); folding differences are 0
    assert table.p_ttest.notna().sum() == 4
    for metric, values in (("dice_mean", DICE), ("wall_seconds", WALL)):
        for arm in ("dynomp", "fp32"):
            row = table.loc[(metric, arm)]
            # dynomp's sub-04 diverged: left out of everything, counted in n_diverged
            kept = 3 if arm == "dynomp" else 4
            mine, baseline = np.array(values[arm][:kept]), np.array(values["fp64"][:kept])
            diverged = 1 if arm == "dynomp" else 0
            assert (row.n, row.n_paired, row.n_diverged) == (kept, kept, diverged)
            assert row["mean"] == pytest.approx(mine.mean())
            assert row["median"] == pytest.approx(np.median(mine))
            assert row.sd == pytest.approx(mine.std(ddof=1))
            assert row.mean_difference == pytest.approx((mine - baseline).mean())
            assert row.ratio_of_means == pytest.approx(mine.mean() / baseline.mean())
            differences = mine - baseline
            t = differences.mean() / (differences.std(ddof=1) / math.sqrt(kept))
            p = 2 * scipy_stats.t.sf(abs(t), kept - 1)
            assert (row.t, row.p_ttest) == (pytest.approx(t), pytest.approx(p))
            assert row.p_ttest_bonferroni == pytest.approx(min(1.0, 4 * p))
            wilcoxon = scipy_stats.wilcoxon(mine, baseline).pvalue
            assert row.p_wilcoxon == pytest.approx(wilcoxon)
    # the exact signed-rank p by enumerating the 2^n equally likely sign patterns
    for metric, values in (("dice_mean", DICE), ("wall_seconds", WALL)):
        differences = np.array(values["fp32"]) - np.array(values["fp64"])
        ranks = scipy_stats.rankdata(np.abs(differences))
        observed = ranks[differences > 0].sum()
        patterns = [sum(r for r, s in zip(ranks, signs, strict=True) if s)
                    for signs in itertools.product((0, 1), repeat=len(ranks))]
        lower = np.mean([w <= observed for w in patterns])
        upper = np.mean([w >= observed for w in patterns])
        exact = min(1.0, 2 * min(lower, upper))
        assert table.loc[(metric, "fp32")].p_wilcoxon == pytest.approx(exact)
    baseline = table.loc[("dice_mean", "fp64")]
    assert baseline.n == 4 and math.isnan(baseline.p_ttest) and baseline.n_paired == 0
    missing = table.loc[("peak_rss_bytes", "dynomp")]
    assert missing.n == 0 and math.isnan(missing["mean"]) and math.isnan(missing.p_ttest)


def test_learning_summary(made_tables):
    summary = compute_stats(tables=made_tables)["learning_summary"]
    assert summary.run.tolist() == [
        "learning/2d/fp32", "learning/3d/fp32", "learning/2d/dynomp", "learning/2d/amp",
        "learning/classification/fp32"]
    summary = summary.set_index("run")
    trace = pd.read_parquet(made_tables / "learning_trace.parquet")
    for dim, steps, pairs, dice in ((2, 20, 2, 0.8), (3, 10, 1, 0.5)):
        run = f"learning/{dim}d/fp32"
        row = summary.loc[run]
        losses = trace[trace.run == run].loss_total.to_numpy()
        assert (row.arm, row.task, row.dim) == ("fp32", "registration", dim)
        assert row.final_loss == pytest.approx(losses[-(steps // 10):].mean())  # last 10%
        assert row.steps == steps and row.steps_fp32 == steps and row.steps_bf16 == 0
        assert row.held_out_pairs == pairs and row.held_out_dice_mean == pytest.approx(dice)
        assert math.isnan(row.held_out_accuracy)  # a registration run has no accuracy
    assert summary.loc["learning/2d/fp32"].held_out_jacobian_nonpositive_percent == (
        pytest.approx(1.0))
    dynomp = summary.loc["learning/2d/dynomp"]
    assert (dynomp.steps_fp32, dynomp.steps_bf16, dynomp.steps_fp16) == (10, 6, 4)
    assert dynomp.held_out_pairs == 0 and math.isnan(dynomp.held_out_dice_mean)
    amp = summary.loc["learning/2d/amp"]
    assert amp.status == "diverged at step 5" and math.isnan(amp.final_loss)
    classification = summary.loc["learning/classification/fp32"]
    assert classification.held_out_accuracy == pytest.approx(0.93) and pd.isna(classification.dim)
    assert classification.steps == 1 and classification.held_out_pairs == 0


def test_final_loss_of_a_short_trace_is_its_last_step():
    assert final_loss(pd.Series([3.0, 2.0, 1.0])) == 1.0
    assert final_loss(pd.Series(np.arange(1.0, 22.0))) == pytest.approx(np.mean([19, 20, 21]))
    assert math.isnan(final_loss(pd.Series([1.0, math.nan])))
    assert math.isnan(final_loss(pd.Series([], dtype=float)))


def test_relative_loss_difference_matches_the_benchmarks_definition():
    path = Path(__file__).parents[2] / "benchmarks" / "registration.py"
    spec = importlib.util.spec_from_file_location("registration_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    candidate = {"rigid/0": -0.71, "affine/0": -0.69, "syn/0": 0.0, "syn/1": -0.97}
    reference = {"rigid/0": -0.70, "affine/0": -0.70, "syn/0": 0.0, "syn/2": -1.0}
    assert relative_loss_differences(candidate, reference, absolute=True) == pytest.approx(
        benchmark.relative_loss_differences(candidate, reference))
    signed = relative_loss_differences(candidate, reference)
    assert signed == pytest.approx({"rigid/0": -0.01 / 0.70, "affine/0": 0.01 / 0.70})
    assert math.isnan(relative_loss_difference(1.0, 0.0))
    assert math.isnan(relative_loss_difference(math.inf, 1.0))


def test_stats_of_the_study(study, study_tables, tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["stats", "--tables", str(study_tables), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "loss_difference\t18", "arm_comparison\t28", "learning_summary\t4"]
    for name in ("loss_difference", "arm_comparison", "learning_summary"):
        parquet = pd.read_parquet(out / f"{name}.parquet")
        tsv = pd.read_csv(out / f"{name}.tsv", sep="\t", na_values="n/a", keep_default_na=False)
        assert list(tsv.columns) == list(parquet.columns) and len(tsv) == len(parquet)
    table = pd.read_parquet(out / "loss_difference.parquet").set_index(["arm", "stage", "level"])
    finals = {(run.parent.name, run.name): json.loads((run / "metrics.json").read_text())
              ["final_losses"] for run in study["registration_runs"]}
    for arm, (stage, level) in itertools.product(("fp32", "dynomp"),
                                                 [(s, v) for s in ("rigid", "affine", "syn")
                                                  for v in (0, 1)]):
        key = f"{stage}/{level}"
        # metrics.json's final losses are the last trace losses the table is computed from
        expected = [(finals[(s, arm)][key] - finals[(s, "fp64")][key])
                    / abs(finals[(s, "fp64")][key]) for s in SUBJECTS]
        row = table.loc[(arm, stage, level)]
        assert row.n == 3 and row["mean"] == pytest.approx(np.mean(expected), rel=1e-9, abs=1e-15)
        assert row.p_value == pytest.approx(
            scipy_stats.ttest_1samp(expected, 0.0, alternative="greater").pvalue, rel=1e-6)
    diverged = table.loc[DIVERGING_RUN[1]]
    assert len(diverged) == 6 and (diverged.n == 0).all() and (diverged.n_diverged == 1).all()
    summary = pd.read_parquet(out / "learning_summary.parquet").set_index(["dim", "arm"])
    assert summary.loc[(2, "fp16"), "status"] == "diverged at step 2"
    assert math.isnan(summary.loc[(2, "fp16"), "final_loss"])
    for dim in (2, 3):
        assert summary.loc[(dim, "fp32"), "held_out_pairs"] == 2
        assert summary.loc[(dim, "fp32"), "steps_fp32"] == 3


@pytest.mark.parametrize(("arguments", "message"), [
    (["--baseline", "fp65"], "--baseline: unknown arm 'fp65'"),
    (["--baseline", "bf16"], "--baseline: arm 'bf16' has no runs in"),
    (["--arm", "tf32"], "--arm: unknown arm 'tf32'"),
    (["--arm", "fp16"], "--arm: arm 'fp16' has no runs in"),
    (["--alpha", "1.5"], "--alpha: must be between 0 and 1, got 1.5"),
])
def test_bad_options_are_one_line_errors(made_tables, tmp_path, capsys, arguments, message):
    assert main(["stats", "--tables", str(made_tables), "--out", str(tmp_path / "s"),
                 *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "s").exists()


def test_tables_folder_without_its_tables_is_an_error(made_tables, tmp_path, capsys):
    (made_tables / "registration_trace.parquet").unlink()
    assert main(["stats", "--tables", str(made_tables), "--out", str(tmp_path / "s")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"dynomp stats: error: {made_tables / 'registration_trace.parquet'}: "
                     "not found (write it with `dynomp tables`)")
    assert main(["stats", "--tables", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'nowhere'}: not a directory" in capsys.readouterr().err
    runs = pd.read_parquet(made_tables / "runs.parquet").drop(columns=["status"])
    runs.to_parquet(made_tables / "runs.parquet", index=False)
    assert main(["stats", "--tables", str(made_tables), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{made_tables / 'runs.parquet'}: missing column(s) status")


def test_empty_tables_give_empty_statistics(tmp_path, capsys):
    assert main(["tables", "--out", str(tmp_path / "t")]) == 0
    assert main(["stats", "--tables", str(tmp_path / "t"), "--out", str(tmp_path / "s")]) == 0
    for name in ("loss_difference", "arm_comparison", "learning_summary"):
        assert pd.read_parquet(tmp_path / "s" / f"{name}.parquet").empty
    assert main(["stats", "--tables", str(tmp_path / "t"), "--out", str(tmp_path / "s"),
                 "--baseline", "fp65"]) == 2
