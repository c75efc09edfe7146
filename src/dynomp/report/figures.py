"""The figures of a study, from the tables of `dynomp tables`, each as PNG and SVG.

- ``pmin_traces``: p_min and its moving average over the iterations of each stage x level (the
  DynoMP paper's Fig. 1): one subject drawn in full, its points coloured by the format that ran the
  iteration, the other subjects' smoothed p_min faint behind it, and a labelled line at the
  significand precision p of each format the arm could choose.
- ``loss_curves``: training loss by step, one line per learning arm (or, in a study without
  training runs, the registration loss by iteration per arm for one subject).
- ``registration_by_arm``: Dice, % det J <= 0, wall time and peak memory by registration arm, one
  point per subject over a box plot; diverged runs as red crosses.
- ``learning_by_arm``: held-out Dice and final loss by learning arm; diverged arms marked.

Every figure is written even when the tables hold nothing for it: it then says "no data", so a
workflow's outputs always exist. The figures are drawn on matplotlib `Figure` objects with the Agg
canvas, never through pyplot's global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dynomp.atomic import atomic_path
from dynomp.learning.strategies import STRATEGIES
from dynomp.precision.formats import FORMATS
from dynomp.registration.config import STAGE_NAMES
from dynomp.registration.precision import ARMS as REGISTRATION_ARMS
from dynomp.report.stats import final_loss
from dynomp.report.tables import read_table

FIGURE_NAMES = ("pmin_traces", "loss_curves", "registration_by_arm", "learning_by_arm")
FIGURE_SUFFIXES = (".png", ".svg")
# one colour per format, the same in every figure
FORMAT_COLOURS = dict(zip(FORMATS, ("#1b9e77", "#7570b3", "#66a61e", "#a6761d", "#d95f02",
                                    "#e7298a", "#e6ab02", "#666666"), strict=True))
FAINT_SUBJECTS = 50
MEBIBYTE = 2.0**20


def save_figure(figure: Figure, *, out: str | os.PathLike, name: str) -> list[Path]:
    """Write `figure` as out/name.png and out/name.svg, atomically; return both paths."""
    FigureCanvasAgg(figure)
    paths = []
    for suffix in FIGURE_SUFFIXES:
        path = Path(out) / f"{name}{suffix}"
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=suffix[1:], dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def no_data_figure(title: str, reason: str) -> Figure:
    """A figure that says there is nothing to draw, and why."""
    figure = Figure(figsize=(6, 3))
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, f"no data: {reason}", ha="center", va="center", transform=axes.transAxes)
    return figure


def _ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """`names` in the order of `order`, unknown names after, alphabetically."""
    unique = set(names)
    return [n for n in order if n in unique] + sorted(unique - set(order))


def _stage_order(stage: str) -> tuple[int, str]:
    return (STAGE_NAMES.index(stage) if stage in STAGE_NAMES else len(STAGE_NAMES), stage)


def pmin_arm(trace: pd.DataFrame) -> str | None:
    """The registration arm whose p_min to draw: dynomp when it has p_min values, else the first."""
    with_pmin = trace[np.isfinite(trace.pmin_smoothed.astype("float64"))]
    arms = _ordered(with_pmin.arm.unique(), REGISTRATION_ARMS)
    if not arms:
        return None
    return "dynomp" if "dynomp" in arms else arms[0]


def arm_formats(runs: pd.DataFrame, trace: pd.DataFrame, arm: str) -> list[str]:
    """The formats `arm` could run in (runs' formats column), else those its trace shows."""
    listed = runs[(runs.kind == "registration") & (runs.arm == arm)].formats.dropna()
    names = {name for entry in listed for name in str(entry).split(",") if name}
    names |= set(trace[trace.arm == arm].format.dropna())
    return [name for name in FORMATS if name in names]


def pmin_traces_figure(*, trace: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """p_min and smoothed p_min per stage x level, coloured by format, with the formats' p."""
    arm = pmin_arm(trace) if len(trace) else None
    if arm is None:
        return no_data_figure("p_min over iterations", "no registration trace with p_min values")
    data = trace[trace.arm == arm]
    subjects = sorted(data.subject.unique())
    shown = subjects[0]
    faint = subjects[1:FAINT_SUBJECTS + 1]
    stages = sorted(data.stage.unique(), key=_stage_order)
    levels = int(data.level.max()) + 1
    figure = Figure(figsize=(3.6 * levels, 2.8 * len(stages)), layout="constrained")
    grid = figure.subplots(len(stages), levels, squeeze=False, sharey=True)
    formats = arm_formats(runs, trace, arm)
    for row, stage in enumerate(stages):
        for level in range(levels):
            axes = grid[row][level]
            here = data[(data.stage == stage) & (data.level == level)]
            if here.empty:
                axes.set_axis_off()
                continue
            for subject in faint:
                other = here[here.subject == subject]
                axes.plot(other.iteration, other.pmin_smoothed, color="0.6", alpha=0.3, lw=0.8)
            main = here[here.subject == shown].sort_values("iteration")
            axes.plot(main.iteration, main.pmin, color="0.35", lw=0.8, ls=":")
            axes.plot(main.iteration, main.pmin_smoothed, color="black", lw=1.2)
            axes.scatter(main.iteration, main.pmin_smoothed, s=12, zorder=3,
                         c=[FORMAT_COLOURS.get(f, "black") for f in main.format])
            for name in formats:
                precision = FORMATS[name].precision
                axes.axhline(precision, color=FORMAT_COLOURS[name], lw=0.9, ls="--")
                axes.annotate(f"{name} p={precision}", xy=(1.0, precision),
                              xycoords=("axes fraction", "data"), ha="right", va="bottom",
                              fontsize=7, color=FORMAT_COLOURS[name])
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_title(f"{stage}, level {level}", fontsize=9)
            if level == 0:
                axes.set_ylabel("bits")
            if row == len(stages) - 1:
                axes.set_xlabel("iteration")
    used = _ordered(data[data.subject == shown].format.dropna().unique(), list(FORMATS))
    handles = [Line2D([], [], color="black", lw=1.2, label="smoothed p_min"),
               Line2D([], [], color="0.35", lw=0.8, ls=":", label="p_min")]
    handles += [Line2D([], [], marker="o", ls="", color=FORMAT_COLOURS.get(f, "black"),
                       label=f"ran in {f}") for f in used]
    handles.append(Line2D([], [], color="0.3", lw=0.9, ls="--", label="a format's precision p"))
    if faint:
        handles.append(Line2D([], [], color="0.6", alpha=0.5, label=f"{len(faint)} other subjects"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6),
                  fontsize=8)
    figure.suptitle(f"p_min of the {arm} arm, {shown}")
    return figure


def _learning_group(task: str, dim: object) -> str:
    """How a figure names a training set-up: its task and, when known, its dimension."""
    return task if pd.isna(dim) else f"{task}, {int(dim)}-D"


def _learning_runs_in_order(runs: pd.DataFrame) -> list:
    """Training runs ordered by task, dimension, then arm as STRATEGIES lists them."""
    learning = runs[runs.kind == "learning"]
    return sorted(learning.itertuples(), key=lambda run: (
        run.task, -1 if pd.isna(run.dim) else int(run.dim),
        STRATEGIES.index(run.arm) if run.arm in STRATEGIES else len(STRATEGIES), run.arm, run.run))


def _learning_loss_figure(trace: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    ordered = [run for run in _learning_runs_in_order(runs) if (trace.run == run.run).any()]
    groups = list(dict.fromkeys(_learning_group(run.task, run.dim) for run in ordered))
    figure = Figure(figsize=(6.5 * len(groups), 4), layout="constrained")
    grid = figure.subplots(1, len(groups), squeeze=False)
    panels = dict(zip(groups, grid[0], strict=True))
    positive = dict.fromkeys(groups, True)
    for run in ordered:
        group = _learning_group(run.task, run.dim)
        axes = panels[group]
        steps = trace[trace.run == run.run].sort_values("step")
        finite = steps[np.isfinite(steps.loss_total.astype("float64"))]
        positive[group] &= bool((finite.loss_total > 0).all())
        axes.plot(steps.step, steps.loss_total, lw=1.2, label=run.arm)
        if str(run.status).startswith("diverged") and len(finite):
            axes.plot(finite.step.iloc[-1], finite.loss_total.iloc[-1], marker="X",
                      color="red", ms=9, ls="")
            axes.annotate(f"{run.arm}: {run.status}", (finite.step.iloc[-1],
                          finite.loss_total.iloc[-1]), fontsize=7, color="red",
                          xytext=(4, 4), textcoords="offset points")
    for group, axes in panels.items():
        if positive[group]:
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel("total loss")
        axes.set_title(f"training loss ({group})")
        axes.legend(fontsize=8)
    return figure


def _registration_loss_figure(trace: pd.DataFrame) -> Figure:
    counts = trace.groupby("subject").arm.nunique()
    subject = min(counts[counts == counts.max()].index)
    data = trace[trace.subject == subject]
    stages = sorted(data.stage.unique(), key=_stage_order)
    figure = Figure(figsize=(4.5 * len(stages), 3.8), layout="constrained")
    grid = figure.subplots(1, len(stages), squeeze=False)
    for axes, stage in zip(grid[0], stages, strict=True):
        here = data[data.stage == stage]
        for arm in _ordered(here.arm.unique(), REGISTRATION_ARMS):
            steps = here[here.arm == arm].sort_values(["level", "iteration"])
            axes.plot(np.arange(len(steps)), steps.loss, lw=1.2, label=arm)
        # dotted lines where the reference arm moves to the next pyramid level
        first_arm = _ordered(here.arm.unique(), REGISTRATION_ARMS)[0]
        sizes = here[here.arm == first_arm].groupby("level").size().sort_index()
        for boundary in np.cumsum(sizes.to_numpy())[:-1]:
            axes.axvline(boundary - 0.5, color="0.7", ls=":", lw=0.8)
        axes.set_title(stage)
        axes.set_xlabel(f"iteration (levels joined; dotted: {first_arm}'s level changes)")
        axes.set_ylabel("loss")
        axes.legend(fontsize=8)
    figure.suptitle(f"registration loss by arm, {subject}")
    return figure


def loss_curves_figure(*, learning_trace: pd.DataFrame, registration_trace: pd.DataFrame,
                       runs: pd.DataFrame) -> Figure:
    """Training loss by step per learning arm; without training runs, registration loss per arm."""
    if len(learning_trace):
        return _learning_loss_figure(learning_trace, runs)
    if len(registration_trace):
        return _registration_loss_figure(registration_trace)
    return no_data_figure("loss curves", "no training or registration trace")


def _strip(axes, groups: list[tuple[str, np.ndarray, np.ndarray]], *, ylabel: str,
           rng: np.random.Generator) -> None:
    """Box plots of the kept values and jittered points; (label, kept, diverged) per group."""
    positions = np.arange(len(groups))
    kept = [values for _, values, _ in groups]
    if any(len(values) for values in kept):
        axes.boxplot([values if len(values) else [math.nan] for values in kept],
                     positions=positions, widths=0.5, showfliers=False)
    for position, (_, values, diverged) in zip(positions, groups, strict=True):
        jitter = rng.uniform(-0.12, 0.12, size=len(values))
        axes.plot(position + jitter, values, "o", ms=4, alpha=0.7, color="#1f77b4")
        if len(diverged):
            jitter = rng.uniform(-0.12, 0.12, size=len(diverged))
            axes.plot(position + jitter, diverged, "x", ms=6, color="red")
    axes.set_xticks(positions, [label for label, _, _ in groups], rotation=30, ha="right")
    axes.set_ylabel(ylabel)


def registration_by_arm_figure(*, metrics: pd.DataFrame) -> Figure:
    """Dice, % det J <= 0, wall time and peak memory by arm, one point per subject."""
    scalars = metrics[metrics.label == ""]
    if scalars.empty:
        return no_data_figure("registration by arm", "no registration metrics")
    wide = scalars.pivot_table(index=["subject", "arm", "status"], columns="metric",
                               values="value", aggfunc="first", dropna=False).reset_index()
    for column in ("dice_mean", "jacobian_nonpositive_percent", "wall_seconds",
                   "peak_rss_bytes", "peak_child_rss_bytes", "peak_gpu_bytes"):
        if column not in wide.columns:
            wide[column] = math.nan
    # antsRegistration runs in a child process: its memory is the child's peak
    wide["resident_mib"] = wide[["peak_rss_bytes", "peak_child_rss_bytes"]].max(axis=1) / MEBIBYTE
    wide["gpu_mib"] = wide.peak_gpu_bytes / MEBIBYTE
    arms = _ordered(wide.arm.unique(), REGISTRATION_ARMS)
    figure = Figure(figsize=(11, 8), layout="constrained")
    grid = figure.subplots(2, 2)
    rng = np.random.default_rng(0)
    panels = (("dice_mean", "mean Dice"), ("jacobian_nonpositive_percent", "% det J <= 0"),
              ("wall_seconds", "wall time (s)"), ("resident_mib", "peak memory (MiB)"))
    for axes, (column, label) in zip(grid.flat, panels, strict=True):
        groups = []
        for arm in arms:
            rows = wide[wide.arm == arm]
            values = rows[column].astype("float64")
            diverged = rows.status == "diverged"
            groups.append((arm, values[~diverged].dropna().to_numpy(),
                           values[diverged].dropna().to_numpy()))
        _strip(axes, groups, ylabel=label, rng=rng)
        axes.set_title(label)
    memory_axes = grid.flat[3]
    if wide.gpu_mib.notna().any():
        for position, arm in enumerate(arms):
            values = wide[wide.arm == arm].gpu_mib.dropna()
            memory_axes.plot(np.full(len(values), position + 0.25), values, "^", ms=5,
                             color="#ff7f0e")
        memory_axes.legend(handles=[
            Line2D([], [], marker="o", ls="", color="#1f77b4", label="resident (process or child)"),
            Line2D([], [], marker="^", ls="", color="#ff7f0e", label="GPU"),
        ], fontsize=8)
    subjects = wide.subject.nunique()
    figure.suptitle(f"registration by arm ({subjects} subject{'s' * (subjects != 1)}; "
                    "red crosses: diverged runs)")
    return figure


def learning_by_arm_figure(*, runs: pd.DataFrame, trace: pd.DataFrame,
                           evaluation: pd.DataFrame) -> Figure:
    """Held-out Dice (one point per pair) and final loss by learning arm, diverged arms marked."""
    entries = _learning_runs_in_order(runs)
    if not entries:
        return no_data_figure("learning by arm", "no training runs")
    groups = {_learning_group(run.task, run.dim) for run in entries}
    labels = [run.arm if len(groups) == 1 else f"{run.arm} ({_learning_group(run.task, run.dim)})"
              for run in entries]
    figure = Figure(figsize=(max(11.0, 0.6 * len(entries) + 4), 4.5), layout="constrained")
    dice_axes, loss_axes = figure.subplots(1, 2)
    positions = np.arange(len(entries))
    rng = np.random.default_rng(0)
    for position, run in zip(positions, entries, strict=True):
        diverged = str(run.status).startswith("diverged")
        held_out = evaluation[(evaluation.run == run.run) & (evaluation.metric == "dice")]
        dice = held_out.groupby(["moving", "fixed"]).value.mean().to_numpy()
        if len(dice):
            dice_axes.plot(position + rng.uniform(-0.12, 0.12, size=len(dice)), dice, "o", ms=4,
                           alpha=0.7, color="#1f77b4")
            dice_axes.plot([position - 0.25, position + 0.25], [dice.mean()] * 2, color="black")
        steps = trace[trace.run == run.run].sort_values("step")
        loss = final_loss(steps.loss_total) if len(steps) else math.nan
        loss_axes.bar(position, loss if math.isfinite(loss) else 0.0,
                      color="#d62728" if diverged else "#1f77b4", hatch="//" if diverged else None,
                      alpha=0.8)
        for axes in (dice_axes, loss_axes):
            if diverged:
                axes.annotate(str(run.status), (position, 0.02), xycoords=("data", "axes fraction"),
                              rotation=90, ha="center", va="bottom", fontsize=8, color="red")
    for axes, title in ((dice_axes, "held-out Dice (mean over labels, one point per pair)"),
                        (loss_axes, "final loss (mean of the last 10% of steps)")):
        axes.set_xticks(positions, labels, rotation=30, ha="right")
        axes.set_xlim(-0.6, len(entries) - 0.4)
        axes.set_title(title, fontsize=10)
    dice_axes.set_ylabel("Dice")
    loss_axes.set_ylabel("total loss")
    figure.suptitle("learning arms (red: diverged)")
    return figure


def build_figures(*, tables: str | os.PathLike) -> dict[str, Figure]:
    """Every figure of the study, by name, from the tables in `tables`."""
    tables = Path(tables)
    if not tables.is_dir():
        raise FileNotFoundError(f"{tables}: not a directory (write it with `dynomp tables`)")
    runs = read_table(tables, "runs")
    registration_trace = read_table(tables, "registration_trace")
    registration_metrics = read_table(tables, "registration_metrics")
    learning_trace = read_table(tables, "learning_trace")
    evaluation = read_table(tables, "learning_evaluation")
    return {
        "pmin_traces": pmin_traces_figure(trace=registration_trace, runs=runs),
        "loss_curves": loss_curves_figure(learning_trace=learning_trace,
                                          registration_trace=registration_trace, runs=runs),
        "registration_by_arm": registration_by_arm_figure(metrics=registration_metrics),
        "learning_by_arm": learning_by_arm_figure(runs=runs, trace=learning_trace,
                                                  evaluation=evaluation),
    }


def write_figures(*, tables: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Draw every figure and write each as out/<name>.png and .svg; return the paths."""
    paths = []
    for name, figure in build_figures(tables=tables).items():
        paths += save_figure(figure, out=out, name=name)
    return paths
