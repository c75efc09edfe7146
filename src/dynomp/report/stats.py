"""The statistics of a study, from the tables of `dynomp tables`.

- ``loss_difference`` (the DynoMP paper's Table 2): for each arm, stage and level, the relative
  final-loss difference d = (L_arm - L_ref) / |L_ref| per subject, where L is the loss of the last
  iteration of that stage and level in the trace and the reference is the baseline arm; then n,
  mean, sd, a one-sided one-sample t-test of H0: E[d] <= 0 against H1: E[d] > 0 (the arm ends at a
  higher loss: degradation), its p-value, the Bonferroni-corrected p (times the number m of tested
  stage x level rows of that arm, capped at 1), and simultaneous Bonferroni confidence intervals:
  each two-sided at level 1 - alpha/m, so that all m hold together with probability >= 1 - alpha.
  The ANTs arms' losses are antsRegistration's own metric values, not on the engine's scale, so an
  ANTs arm is compared with the ANTs arm at the baseline's precision (ants-fp32 with ants-fp64
  when the baseline is fp64); the ``baseline`` column says which reference a row used.
  A stage x level where a run diverged (and every later one, which it never reached) has no final
  loss: that subject is left out of the row and counted in ``n_diverged``.
- ``arm_comparison``: for Dice, folding, SDlogJ, wall time and peak memory, per arm: n, mean, sd,
  median over the runs that did not diverge; then, paired by subject with the baseline arm: the
  mean difference, the ratio of means, a two-sided paired t-test and a Wilcoxon signed-rank test,
  each Bonferroni-corrected over the comparisons (metric x arm) it was computed for.
- ``learning_summary``: per training run: status, final loss (the mean total loss over the last
  10% of the trace's steps, at least one; NaN for a diverged run), steps in each format, and
  the held-out Dice and folding from `dynomp evaluate-model`.

scipy.stats does the tests; this module only pairs, groups and corrects.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from dynomp.precision.formats import FORMATS
from dynomp.registration.config import STAGE_NAMES
from dynomp.registration.precision import ARMS as REGISTRATION_ARMS
from dynomp.report.tables import read_table, write_table

ARM_COMPARISON_METRICS = (
    "dice_mean", "jacobian_nonpositive_percent", "sd_log_jacobian", "wall_seconds",
    "peak_rss_bytes", "peak_child_rss_bytes", "peak_gpu_bytes",
)
LOSS_DIFFERENCE_COLUMNS = (
    "arm", "baseline", "stage", "level", "n", "n_diverged", "mean", "sd", "t", "df", "p_value",
    "p_bonferroni", "comparisons", "ci_level", "ci_low", "ci_high",
)
ARM_COMPARISON_COLUMNS = (
    "metric", "arm", "baseline", "n", "n_diverged", "mean", "sd", "median", "n_paired",
    "mean_difference", "ratio_of_means", "t", "p_ttest", "p_ttest_bonferroni", "p_wilcoxon",
    "p_wilcoxon_bonferroni",
)
FORMAT_STEP_COLUMNS = tuple(f"steps_{name}" for name in FORMATS)
LEARNING_SUMMARY_COLUMNS = (
    "arm", "task", "dim", "status", "steps", "final_loss", *FORMAT_STEP_COLUMNS, "held_out_pairs",
    "held_out_dice_mean", "held_out_jacobian_nonpositive_percent", "held_out_accuracy", "run",
)
FINAL_LOSS_FRACTION = 0.1


def relative_loss_difference(arm_loss: float, baseline_loss: float) -> float:
    """(L_arm - L_baseline) / |L_baseline|; NaN when L_baseline is 0 or either is not finite."""
    if not (math.isfinite(arm_loss) and math.isfinite(baseline_loss)) or baseline_loss == 0:
        return math.nan
    return (arm_loss - baseline_loss) / abs(baseline_loss)


def relative_loss_differences(
    candidate: dict[str, float], reference: dict[str, float], *, absolute: bool = False
) -> dict[str, float]:
    """relative_loss_difference per "stage/level" key in both (|.| with absolute=True)."""
    differences = {}
    for key, baseline_loss in reference.items():
        if key in candidate:
            difference = relative_loss_difference(candidate[key], baseline_loss)
            if not math.isnan(difference):
                differences[key] = abs(difference) if absolute else difference
    return differences


def bonferroni(p_values: pd.Series) -> pd.Series:
    """Each p times the number of finite p-values, capped at 1 (NaN stays NaN)."""
    comparisons = int(p_values.notna().sum())
    return (p_values * comparisons).clip(upper=1.0)


def one_sided_degradation_test(differences: Sequence[float], *, alpha: float,
                               comparisons: int) -> dict[str, float]:
    """n, mean, sd, t, df and p of H1: mean > 0, and the two-sided CI at 1 - alpha/comparisons."""
    values = np.asarray(differences, dtype=np.float64)
    n = len(values)
    result = {"n": n, "mean": float(values.mean()) if n else math.nan,
              "sd": float(values.std(ddof=1)) if n >= 2 else math.nan,
              "t": math.nan, "df": math.nan, "p_value": math.nan, "ci_low": math.nan,
              "ci_high": math.nan}
    if n < 2:
        return result
    with warnings.catch_warnings():
        # identical differences (sd 0) give t = +-inf or NaN, which is the honest answer
        warnings.simplefilter("ignore", RuntimeWarning)
        test = scipy_stats.ttest_1samp(values, 0.0, alternative="greater")
    level = 1.0 - alpha / max(comparisons, 1)
    half_width = scipy_stats.t.ppf(1.0 - (1.0 - level) / 2.0, n - 1) * result["sd"] / math.sqrt(n)
    result.update(t=float(test.statistic), df=float(n - 1), p_value=float(test.pvalue),
                  ci_low=result["mean"] - half_width, ci_high=result["mean"] + half_width)
    return result


def _stage_order(stage: str) -> int:
    return STAGE_NAMES.index(stage) if stage in STAGE_NAMES else len(STAGE_NAMES)


def final_losses(trace: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """subject, arm, stage, level, final_loss: the last iteration's loss of each stage x level.

    The stage x level where a run diverged is dropped: its last finite loss is not a final one.
    """
    if trace.empty:
        return pd.DataFrame(columns=["subject", "arm", "stage", "level", "final_loss"])
    ordered = trace.sort_values(["subject", "arm", "stage", "level", "iteration"])
    last = ordered.groupby(["subject", "arm", "stage", "level"], sort=False).tail(1)
    last = last[["subject", "arm", "stage", "level", "loss"]].rename(columns={"loss": "final_loss"})
    diverged = runs[(runs.kind == "registration") & runs.diverged_stage.notna()]
    if len(diverged):
        where = diverged[["subject", "arm", "diverged_stage", "diverged_level"]].rename(
            columns={"diverged_stage": "stage", "diverged_level": "level"})
        where = where.astype({"level": "int64"})
        marked = last.merge(where.assign(dropped=True), on=["subject", "arm", "stage", "level"],
                            how="left")
        last = marked[marked.dropped.isna()].drop(columns="dropped")
    return last.reset_index(drop=True)


def loss_reference_arm(arm: str, baseline: str) -> str:
    """The arm whose final losses `arm` is compared with: ANTs arms with ANTs at the baseline's."""
    if arm.startswith("ants-") and not baseline.startswith("ants-"):
        return f"ants-{baseline}"
    return baseline


def check_baseline(baseline: str, arms_present: Sequence[str], *, source: Path) -> str:
    """`baseline` if it is a known arm present in the tables, else a one-line ValueError."""
    if baseline not in REGISTRATION_ARMS:
        raise ValueError(
            f"--baseline: unknown arm {baseline!r} (known: {', '.join(REGISTRATION_ARMS)})"
        )
    if baseline not in arms_present:
        raise ValueError(
            f"--baseline: arm {baseline!r} has no runs in {source} "
            f"(arms present: {', '.join(sorted(arms_present)) or 'none'})"
        )
    return baseline


def check_arms(arms: Sequence[str] | None, arms_present: Sequence[str], *,
               source: Path) -> list[str] | None:
    """The --arm selection, each known and present in the tables, or a one-line ValueError."""
    if not arms:
        return None
    for arm in arms:
        if arm not in REGISTRATION_ARMS:
            raise ValueError(f"--arm: unknown arm {arm!r} (known: {', '.join(REGISTRATION_ARMS)})")
        if arm not in arms_present:
            raise ValueError(
                f"--arm: arm {arm!r} has no runs in {source} "
                f"(arms present: {', '.join(sorted(arms_present)) or 'none'})"
            )
    return list(arms)


def loss_difference_table(*, trace: pd.DataFrame, runs: pd.DataFrame, baseline: str,
                          alpha: float, arms: Sequence[str] | None = None) -> pd.DataFrame:
    """The paper's Table 2 for every non-reference arm (or `arms`), one row per stage x level."""
    finals = final_losses(trace, runs)
    registration_runs = runs[runs.kind == "registration"]
    present = sorted(set(registration_runs.arm))
    candidates = [arm for arm in (arms or present)
                  if arm != baseline and loss_reference_arm(arm, baseline) != arm]
    rows = []
    for arm in candidates:
        reference = loss_reference_arm(arm, baseline)
        arm_finals = finals[finals.arm == arm]
        reference_finals = finals[finals.arm == reference]
        paired = arm_finals.merge(reference_finals, on=["subject", "stage", "level"],
                                  suffixes=("", "_reference"))
        paired["difference"] = [
            relative_loss_difference(a, b)
            for a, b in zip(paired.final_loss, paired.final_loss_reference, strict=True)
        ]
        # subjects with both runs: those without a final loss here diverged at or before it
        arm_runs = registration_runs[registration_runs.arm == arm]
        subjects_with_both = set(arm_runs.subject) & set(
            registration_runs[registration_runs.arm == reference].subject)
        diverged_subjects = (set(arm_runs[arm_runs.status == "diverged"].subject)
                             & subjects_with_both)
        stage_levels = sorted(
            {(stage, int(level)) for finals_of_arm in (reference_finals, arm_finals)
             for stage, level in zip(finals_of_arm.stage, finals_of_arm.level, strict=True)},
            key=lambda key: (_stage_order(key[0]), key[0], key[1]),
        )
        arm_rows = []
        for stage, level in stage_levels:
            here = paired[(paired.stage == stage) & (paired.level == level)]
            differences = here.difference.dropna()
            with_value = set(arm_finals[(arm_finals.stage == stage)
                                        & (arm_finals.level == level)].subject)
            arm_rows.append({"arm": arm, "baseline": reference, "stage": stage, "level": level,
                             "n_diverged": len(diverged_subjects - with_value),
                             "differences": differences.to_numpy()})
        comparisons = sum(len(row["differences"]) >= 2 for row in arm_rows)
        for row in arm_rows:
            differences = row.pop("differences")
            tested = one_sided_degradation_test(differences, alpha=alpha, comparisons=comparisons)
            p_value = tested["p_value"]
            rows.append({
                **row, **tested, "comparisons": comparisons,
                "p_bonferroni": min(1.0, p_value * comparisons) if not math.isnan(p_value)
                else math.nan,
                "ci_level": 1.0 - alpha / comparisons if comparisons else math.nan,
            })
    table = pd.DataFrame(rows, columns=list(LOSS_DIFFERENCE_COLUMNS))
    counts = ("level", "n", "n_diverged", "comparisons")
    return table.astype({
        **{column: "float64" for column in LOSS_DIFFERENCE_COLUMNS},
        "arm": "string", "baseline": "string", "stage": "string",
        **{column: "int64" for column in counts},
    })


def _paired_tests(arm_values: np.ndarray, baseline_values: np.ndarray) -> dict[str, float]:
    result = {"mean_difference": math.nan, "ratio_of_means": math.nan, "t": math.nan,
              "p_ttest": math.nan, "p_wilcoxon": math.nan}
    n = len(arm_values)
    if n == 0:
        return result
    baseline_mean = float(baseline_values.mean())
    result["mean_difference"] = float((arm_values - baseline_values).mean())
    if baseline_mean:
        result["ratio_of_means"] = float(arm_values.mean()) / baseline_mean
    if n < 2:
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            test = scipy_stats.ttest_rel(arm_values, baseline_values)
            result["t"], result["p_ttest"] = float(test.statistic), float(test.pvalue)
        except (ValueError, FloatingPointError):
            pass
        try:
            result["p_wilcoxon"] = float(scipy_stats.wilcoxon(arm_values, baseline_values).pvalue)
        except (ValueError, FloatingPointError):
            pass  # e.g. every difference is zero: no rank test to make
    return result


def arm_comparison_table(*, metrics: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per metric x arm: descriptives over runs that did not diverge; paired tests vs `baseline`."""
    scalars = metrics[(metrics.label == "") & metrics.metric.isin(ARM_COMPARISON_METRICS)]
    arms = sorted(set(metrics.arm), key=lambda arm: (arm != baseline, arm))
    statuses = metrics.drop_duplicates(["subject", "arm"]).set_index(["subject", "arm"]).status
    rows = []
    for metric in ARM_COMPARISON_METRICS:
        values = scalars[scalars.metric == metric]
        kept = values[values.status != "diverged"].dropna(subset=["value"])
        reference = kept[kept.arm == baseline].set_index("subject").value
        for arm in arms:
            arm_values = kept[kept.arm == arm].set_index("subject").value
            diverged = int((statuses.xs(arm, level="arm") == "diverged").sum())
            row = {"metric": metric, "arm": arm, "baseline": baseline, "n": len(arm_values),
                   "n_diverged": diverged,
                   "mean": float(arm_values.mean()) if len(arm_values) else math.nan,
                   "sd": float(arm_values.std(ddof=1)) if len(arm_values) >= 2 else math.nan,
                   "median": float(arm_values.median()) if len(arm_values) else math.nan}
            subjects = sorted(set(arm_values.index) & set(reference.index))
            if arm == baseline:
                tested = _paired_tests(np.array([]), np.array([]))
                subjects = []
            else:
                tested = _paired_tests(arm_values.loc[subjects].to_numpy(dtype=np.float64),
                                       reference.loc[subjects].to_numpy(dtype=np.float64))
            rows.append({**row, "n_paired": len(subjects), **tested})
    table = pd.DataFrame(rows, columns=list(ARM_COMPARISON_COLUMNS))
    table["p_ttest_bonferroni"] = bonferroni(table.p_ttest.astype("float64"))
    table["p_wilcoxon_bonferroni"] = bonferroni(table.p_wilcoxon.astype("float64"))
    numeric = {c: "float64" for c in ARM_COMPARISON_COLUMNS[5:] if c != "n_paired"}
    return table.astype({"metric": "string", "arm": "string", "baseline": "string", "n": "int64",
                         "n_diverged": "int64", "n_paired": "int64", **numeric})


def final_loss(losses: pd.Series) -> float:
    """The mean of the last 10% (at least one) of a trace's steps; NaN when one is not finite.

    A diverged run's last step has a non-finite loss, so its final loss is NaN: the losses before
    the divergence are not a result the run reached.
    """
    count = max(1, math.ceil(FINAL_LOSS_FRACTION * len(losses)))
    tail = losses.iloc[-count:].to_numpy(dtype=np.float64)
    if not len(tail) or not np.isfinite(tail).all():
        return math.nan
    return float(tail.mean())


def learning_summary_table(*, runs: pd.DataFrame, trace: pd.DataFrame, evaluation: pd.DataFrame,
                           metrics: pd.DataFrame) -> pd.DataFrame:
    """Per training run: status, final loss, steps per format, held-out Dice and folding."""
    rows = []
    for run in runs[runs.kind == "learning"].itertuples():
        steps = trace[trace.run == run.run].sort_values("step")
        counts = steps.format.value_counts()
        row = {"arm": run.arm, "task": run.task, "dim": run.dim, "status": run.status,
               "steps": len(steps), "final_loss": final_loss(steps.loss_total),
               **{f"steps_{name}": int(counts.get(name, 0)) for name in FORMATS}, "run": run.run}
        held_out = evaluation[evaluation.run == run.run]
        dice = held_out[held_out.metric == "dice"].groupby(["moving", "fixed"]).value.mean()
        folding = held_out[held_out.metric == "jacobian_nonpositive_percent"].value
        accuracy = metrics[(metrics.run == run.run)
                           & (metrics.metric == "held_out_accuracy")].value
        row.update({
            "held_out_pairs": len(dice),
            "held_out_dice_mean": float(dice.mean()) if len(dice) else math.nan,
            "held_out_jacobian_nonpositive_percent": float(folding.mean()) if len(folding)
            else math.nan,
            "held_out_accuracy": float(accuracy.iloc[0]) if len(accuracy) else math.nan,
        })
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(LEARNING_SUMMARY_COLUMNS))
    return table.astype({"arm": "string", "task": "string", "dim": "Int64", "status": "string",
                         "run": "string", "steps": "int64",
                         "final_loss": "float64", **{c: "int64" for c in FORMAT_STEP_COLUMNS},
                         "held_out_pairs": "int64", "held_out_dice_mean": "float64",
                         "held_out_jacobian_nonpositive_percent": "float64",
                         "held_out_accuracy": "float64"})


def compute_stats(
    *, tables: str | os.PathLike, baseline: str = "fp64", arms: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> dict[str, pd.DataFrame]:
    """loss_difference, arm_comparison and learning_summary from the tables in `tables`."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"--alpha: must be between 0 and 1, got {alpha}")
    tables = Path(tables)
    if not tables.is_dir():
        raise FileNotFoundError(f"{tables}: not a directory (write it with `dynomp tables`)")
    runs = read_table(tables, "runs")
    metrics = read_table(tables, "registration_metrics")
    trace = read_table(tables, "registration_trace",
                       ["subject", "arm", "stage", "level", "iteration", "loss"])
    learning_trace = read_table(tables, "learning_trace")
    evaluation = read_table(tables, "learning_evaluation")
    learning_metrics = read_table(tables, "learning_metrics")
    registration_arms = sorted(set(runs[runs.kind == "registration"].arm))
    if registration_arms:
        check_baseline(baseline, registration_arms, source=tables / "runs.parquet")
        selected = check_arms(arms, registration_arms, source=tables / "runs.parquet")
        loss_difference = loss_difference_table(trace=trace, runs=runs, baseline=baseline,
                                                alpha=alpha, arms=selected)
        comparison = arm_comparison_table(metrics=metrics, baseline=baseline)
    else:
        # a study without registration runs: the tables exist, with their columns and no rows
        check_baseline(baseline, [baseline], source=tables / "runs.parquet")
        loss_difference = loss_difference_table(trace=trace.iloc[:0], runs=runs.iloc[:0],
                                                baseline=baseline, alpha=alpha)
        comparison = arm_comparison_table(metrics=metrics.iloc[:0], baseline=baseline)
    summary = learning_summary_table(runs=runs, trace=learning_trace, evaluation=evaluation,
                                     metrics=learning_metrics)
    return {"loss_difference": loss_difference, "arm_comparison": comparison,
            "learning_summary": summary}


def write_stats(*, tables: str | os.PathLike, out: str | os.PathLike, baseline: str = "fp64",
                arms: Sequence[str] | None = None, alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """compute_stats, each table written as out/<name>.parquet and .tsv; return the tables."""
    results = compute_stats(tables=tables, baseline=baseline, arms=arms, alpha=alpha)
    for name, frame in results.items():
        write_table(frame, out=out, name=name)
    return results
