"""Tidy tables of a study: one row per observation, each written as Parquet and TSV.

`write_tables` reads the run directories that `dynomp register` and `dynomp train` (with
`dynomp evaluate-model`) wrote, and the folder of `dynomp sweep`, and writes in `out`:

Subjects are named ``sub-<label>``: the run's metrics.json "subject" (prefixed when it lacks
``sub-``), else the run directory's parent folder, which must be ``sub-<label>``.

- ``registration_metrics``: subject, arm, status, metric, label, value. Every number of a
  registration's metrics.json; a per-label or per-key number (``dice``, ``jaccard``,
  ``seconds_by_format``, ``final_losses``) gets one row per key, the key in ``label``
  (``seconds_by_format`` becomes metric ``seconds_in_format``, ``final_losses`` ``final_loss``
  with label ``stage/level``). ``label`` is the empty string for a scalar.
- ``registration_trace``: each run's trace.parquet with subject and arm in front.
- ``learning_metrics``: arm, task, dim, status, metric, value, run: every number of a training
  run's metrics.json.
- ``learning_evaluation``: the runs' evaluation.parquet tables, concatenated as they are, with the
  run's task, dim and directory after their own columns.
- ``learning_trace``: each run's trace.parquet with arm, task and dim in front and the run's
  directory last.
- ``runs``: one row per run: kind, subject, arm, task, dim, status, where it diverged (stage, level
  and iteration for a registration, step for training; NaN otherwise), the formats it could use,
  and its directory.

A study trains each arm once per dimension (learning/2d/<ARM>, learning/3d/<ARM>), so a training
run is told apart by its ``run`` column (its directory), not by its arm; ``dim`` comes from the
configuration in its status.json.
- ``sweep_metrics``: the sweep's sweep_metrics.parquet as it is.

Every table is written, with its columns, even when there is no input of its kind, so that a
workflow's outputs always exist.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from dynomp.atomic import atomic_path

TABLE_SUFFIXES = (".parquet", ".tsv")

REGISTRATION_TRACE_COLUMNS = (
    "stage", "level", "iteration", "loss", "pmin", "pmin_smoothed", "format", "seconds",
)
LEARNING_TRACE_COLUMNS = (
    "step", "loss_total", "loss_image", "loss_regularisation", "pmin", "pmin_smoothed", "format",
    "loss_scale", "grad_norm", "parameter_dtype", "compute_dtype", "step_seconds",
    "peak_memory_bytes",
)
EVALUATION_COLUMNS = ("arm", "moving", "fixed", "metric", "label", "value")

# column -> dtype of every table; an empty table gets these columns and types too
SCHEMAS: dict[str, dict[str, str]] = {
    "registration_metrics": {
        "subject": "string", "arm": "string", "status": "string", "metric": "string",
        "label": "string", "value": "float64",
    },
    "registration_trace": {
        "subject": "string", "arm": "string", "stage": "string", "level": "int64",
        "iteration": "int64", "loss": "float64", "pmin": "float64", "pmin_smoothed": "float64",
        "format": "string", "seconds": "float64",
    },
    "learning_metrics": {
        "arm": "string", "task": "string", "dim": "Int64", "status": "string",
        "metric": "string", "value": "float64", "run": "string",
    },
    "learning_evaluation": {
        "arm": "string", "moving": "string", "fixed": "string", "metric": "string",
        "label": "Int64", "value": "float64", "task": "string", "dim": "Int64", "run": "string",
    },
    "learning_trace": {
        "arm": "string", "task": "string", "dim": "Int64", "step": "int64",
        "loss_total": "float64",
        "loss_image": "float64", "loss_regularisation": "float64", "pmin": "float64",
        "pmin_smoothed": "float64", "format": "string", "loss_scale": "float64",
        "grad_norm": "float64", "parameter_dtype": "string", "compute_dtype": "string",
        "step_seconds": "float64", "peak_memory_bytes": "float64", "run": "string",
    },
    "runs": {
        "kind": "string", "subject": "string", "arm": "string", "task": "string", "dim": "Int64",
        "status": "string", "diverged_stage": "string", "diverged_level": "float64",
        "diverged_iteration": "float64", "diverged_step": "float64", "formats": "string",
        "run": "string",
    },
    "sweep_metrics": {"run": "string", "metric": "string", "value": "float64"},
}
TABLE_NAMES = tuple(SCHEMAS)

# metrics.json keys that are a run's settings or provenance, not observations
REGISTRATION_SETTING_KEYS = ("arm", "status", "diverged_at", "versions", "config", "device",
                             "threads", "warp_dtype", "subject")
LEARNING_SETTING_KEYS = ("arm", "status", "task")
# per-key dictionaries of metrics.json whose metric name in the table differs from the key
METRIC_NAMES = {"seconds_by_format": "seconds_in_format", "final_losses": "final_loss"}
DIVERGED_STEP = re.compile(r"diverged at step (\d+)")


def empty_table(name: str) -> pd.DataFrame:
    """The table `name` with its columns and types and no rows."""
    return typed(pd.DataFrame(columns=list(SCHEMAS[name])), name)


def typed(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """`frame` with the schema's columns first, in order, cast to the schema's types."""
    schema = SCHEMAS[name]
    missing = [column for column in schema if column not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)}")
    extra = [column for column in frame.columns if column not in schema]
    frame = frame[[*schema, *extra]].astype(schema)
    return frame.reset_index(drop=True)


def write_tsv(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as tab-separated text, missing values as n/a, quotes only where a value needs them.

    Arrow's CSV writer does it: pandas' to_csv took 45 s against Arrow's 6 s for the 3 million
    trace rows of a 1000-subject study (docs/benchmarks.md, "Report"). Where a value holds a tab, a
    newline or a quote, Arrow refuses to write it unquoted, and pandas writes the table instead,
    quoting that value; pandas also writes what Arrow cannot convert (e.g. a column of lists).
    """
    try:
        options = pa_csv.WriteOptions(delimiter="\t", null_string="n/a", quoting_style="none",
                                      quoting_header="none")
        pa_csv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), path, options)
    except (pa.ArrowException, TypeError):  # TypeError: a pyarrow without these options
        frame.to_csv(path, sep="\t", index=False, na_rep="n/a")


def write_table(frame: pd.DataFrame, *, out: str | os.PathLike, name: str) -> list[Path]:
    """Write `frame` as out/name.parquet and out/name.tsv, atomically; return both paths."""
    paths = []
    for suffix in TABLE_SUFFIXES:
        path = Path(out) / f"{name}{suffix}"
        with atomic_path(path) as temporary:
            if suffix == ".parquet":
                frame.to_parquet(temporary, index=False)
            else:
                write_tsv(frame, temporary)
        paths.append(path)
    return paths


def read_table(tables: str | os.PathLike, name: str,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """tables/name.parquet, only `columns` if given; a one-line error names what is missing."""
    path = Path(tables) / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (write it with `dynomp tables`)")
    present = pq.read_schema(path).names
    missing = [column for column in (columns or SCHEMAS.get(name, ())) if column not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return pd.read_parquet(path, columns=list(columns) if columns else None)


def _read_json(path: Path, run: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {path.name} in this run directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        # a ValueError, not a TypeError: the CLI reports ValueErrors as one line
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return data


def _required(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ValueError(f"{path}: no {key!r} key")
    return data[key]


def _number(value: Any) -> float | None:
    """A metric value as a float (None/null as NaN); None for what is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def metric_rows(data: dict[str, Any], *, skip: Iterable[str]) -> list[dict[str, Any]]:
    """(metric, label, value) rows for every number of a metrics.json, one per key of a dict."""
    rows = []
    skipped = set(skip)
    for key, value in data.items():
        if key in skipped:
            continue
        if isinstance(value, dict):
            metric = METRIC_NAMES.get(key, key)
            for label, item in value.items():
                number = _number(item)
                if number is not None:
                    rows.append({"metric": metric, "label": str(label), "value": number})
            continue
        number = _number(value)
        if number is not None:
            rows.append({"metric": key, "label": "", "value": number})
    return rows


def registration_subject(run: Path, metrics: dict[str, Any]) -> str:
    """The subject of a registration run: metrics.json's "subject", else its sub-<S> parent."""
    subject = metrics.get("subject")
    if subject is None:
        parent = run.resolve().parent.name
        if not parent.startswith("sub-") or parent == "sub-":
            raise ValueError(
                f"{run}: cannot tell the subject: metrics.json has no 'subject' key and the "
                f"parent folder {parent!r} is not sub-<label>"
            )
        return parent
    subject = str(subject)
    return subject if subject.startswith("sub-") else f"sub-{subject}"


def _formats_of_registration(arm: str, metrics: dict[str, Any]) -> str:
    """The formats a registration arm may run in: the controller's set for dynomp, else its own."""
    if arm == "dynomp":
        formats = (metrics.get("config") or {}).get("precision", {}).get("formats")
        if formats:
            return ",".join(formats)
    return arm.removeprefix("ants-")


@dataclass
class StudyParts:
    """What the runs read so far contribute to each table: plain rows, or Arrow tables."""

    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in TABLE_NAMES})
    arrow: dict[str, list[pa.Table]] = field(
        default_factory=lambda: {name: [] for name in TABLE_NAMES})

    def table(self, name: str) -> pd.DataFrame:
        """The table `name` from its parts, typed; empty with its columns when there are none."""
        frames = []
        if self.rows[name]:
            frames.append(pd.DataFrame(self.rows[name], columns=list(SCHEMAS[name])))
        tables = [table for table in self.arrow[name] if table.num_rows]
        if tables:
            # one conversion of one concatenated Arrow table: a pandas frame per run is slow
            frames.append(pa.concat_tables(tables, promote_options="permissive").to_pandas())
        if not frames:
            return empty_table(name)
        return typed(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True), name)


def _read_arrow(path: Path, run: Path, columns: Sequence[str]) -> pa.Table:
    """A run's Parquet file, checked for `columns`, as an Arrow table of those columns first."""
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {path.name} in this run directory")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [column for column in columns if column not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    extra = [column for column in table.column_names
             if column not in columns and not column.startswith("__index_level_")]
    # pandas' metadata describes the file's own columns and index, not the concatenated table
    return table.select([*columns, *extra]).replace_schema_metadata(None)


def _with_constants(table: pa.Table, front: dict[str, Any], *,
                    back: dict[str, Any] | None = None) -> pa.Table:
    """`table` with a constant column in front for each of `front`, and at the end for `back`."""
    def column(value: Any) -> pa.Array:
        kind = pa.int64() if value is None or isinstance(value, int) else pa.string()
        return pa.array([value] * table.num_rows, kind)

    for position, (name, value) in enumerate(front.items()):
        table = table.add_column(position, name, column(value))
    for name, value in (back or {}).items():
        table = table.append_column(name, column(value))
    return table


def read_registration_run(run: str | os.PathLike, parts: StudyParts) -> tuple[str, str]:
    """Add one registration run directory to `parts`; return its (subject, arm)."""
    run = Path(run)
    metrics_path = run / "metrics.json"
    metrics = _read_json(metrics_path, run)
    arm = str(_required(metrics, "arm", metrics_path))
    status = str(_required(metrics, "status", metrics_path))
    subject = registration_subject(run, metrics)
    trace = _read_arrow(run / "trace.parquet", run, REGISTRATION_TRACE_COLUMNS)
    parts.arrow["registration_trace"].append(
        _with_constants(trace.select(list(REGISTRATION_TRACE_COLUMNS)),
                        {"subject": subject, "arm": arm}))
    parts.rows["registration_metrics"] += [
        {"subject": subject, "arm": arm, "status": status, **row}
        for row in metric_rows(metrics, skip=REGISTRATION_SETTING_KEYS)
    ]
    diverged_at = metrics.get("diverged_at") or {}
    parts.rows["runs"].append({
        "kind": "registration", "subject": subject, "arm": arm, "task": "", "dim": None,
        "status": status,
        "diverged_stage": diverged_at.get("stage"),
        "diverged_level": _number(diverged_at.get("level")),
        "diverged_iteration": _number(diverged_at.get("iteration")),
        "diverged_step": math.nan,
        "formats": _formats_of_registration(arm, metrics), "run": str(run),
    })
    return subject, arm


def diverged_step(status: str) -> float:
    """k of a "diverged at step k" status, NaN for any other status."""
    match = DIVERGED_STEP.fullmatch(status.strip())
    return float(match.group(1)) if match else math.nan


def read_learning_run(run: str | os.PathLike, parts: StudyParts) -> None:
    """Add one training run directory (and its evaluation.parquet, if any) to `parts`."""
    run = Path(run)
    metrics_path = run / "metrics.json"
    metrics = _read_json(metrics_path, run)
    arm = str(_required(metrics, "arm", metrics_path))
    status = str(_required(metrics, "status", metrics_path))
    task = str(metrics.get("task", "registration"))
    settings = _read_json(run / "status.json", run).get("config") or {}
    dim = settings.get("dim")
    dim = dim if isinstance(dim, int) and not isinstance(dim, bool) else None
    parts.rows["learning_metrics"] += [
        {"arm": arm, "task": task, "dim": dim, "status": status,
         "metric": row["metric"] if not row["label"] else f"{row['metric']}/{row['label']}",
         "value": row["value"], "run": str(run)}
        for row in metric_rows(metrics, skip=LEARNING_SETTING_KEYS)
    ]
    trace = _read_arrow(run / "trace.parquet", run, LEARNING_TRACE_COLUMNS)
    trace = trace.select(list(LEARNING_TRACE_COLUMNS))
    parts.arrow["learning_trace"].append(
        _with_constants(trace, {"arm": arm, "task": task, "dim": dim}, back={"run": str(run)}))
    evaluation_path = run / "evaluation.parquet"
    if evaluation_path.is_file():
        evaluation = _read_arrow(evaluation_path, run, EVALUATION_COLUMNS)
        parts.arrow["learning_evaluation"].append(_with_constants(
            evaluation.select(list(EVALUATION_COLUMNS)), {},
            back={"task": task, "dim": dim, "run": str(run)}))
    if arm == "dynomp" and settings.get("formats"):
        formats = ",".join(settings["formats"])
    else:
        formats = ",".join(dict.fromkeys(str(f) for f in trace.column("format").to_pylist()
                                         if f is not None))
    parts.rows["runs"].append({
        "kind": "learning", "subject": "", "arm": arm, "task": task, "dim": dim,
        "status": status,
        "diverged_stage": None, "diverged_level": math.nan, "diverged_iteration": math.nan,
        "diverged_step": diverged_step(status), "formats": formats, "run": str(run),
    })


def build_tables(
    *,
    registration_runs: Sequence[str | os.PathLike] = (),
    learning_runs: Sequence[str | os.PathLike] = (),
    sweep: str | os.PathLike | None = None,
) -> dict[str, pd.DataFrame]:
    """Every table of the study, by name, from run directories and a sweep folder."""
    parts = StudyParts()
    seen: dict[tuple[str, str], Path] = {}
    for run in registration_runs:
        key = read_registration_run(run, parts)
        if key in seen:
            raise ValueError(
                f"{run}: {key[0]} arm {key[1]} is already given by {seen[key]}; one run per "
                "subject and arm"
            )
        seen[key] = Path(run)
    for run in learning_runs:
        read_learning_run(run, parts)
    tables = {name: parts.table(name) for name in TABLE_NAMES if name != "sweep_metrics"}
    tables["sweep_metrics"] = (read_sweep(sweep) if sweep is not None
                               else empty_table("sweep_metrics"))
    return {name: tables[name] for name in TABLE_NAMES}


def read_sweep(sweep: str | os.PathLike) -> pd.DataFrame:
    """DIR/sweep_metrics.parquet, checked for its run, metric and value columns."""
    path = Path(sweep) / "sweep_metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {sweep} a `dynomp sweep` folder?)")
    frame = pd.read_parquet(path)
    missing = [column for column in SCHEMAS["sweep_metrics"] if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return typed(frame, "sweep_metrics")


def write_tables(
    *,
    out: str | os.PathLike,
    registration_runs: Sequence[str | os.PathLike] = (),
    learning_runs: Sequence[str | os.PathLike] = (),
    sweep: str | os.PathLike | None = None,
) -> dict[str, pd.DataFrame]:
    """Build every table and write each as out/<name>.parquet and .tsv; return the tables."""
    tables = build_tables(registration_runs=registration_runs, learning_runs=learning_runs,
                          sweep=sweep)
    for name, frame in tables.items():
        write_table(frame, out=out, name=name)
    return tables
