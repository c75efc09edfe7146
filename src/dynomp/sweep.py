"""`dynomp sweep`: controller ablations (p_min window, formats, execution mode) as one job array.

A sweep file names what to run and a grid of controller settings::

    kind: registration                      # or: learning
    registration_config: configs/registration/quick.yaml
    pairs:
      - {name: sub-01, fixed: F.nii.gz, moving: M.nii.gz, fixed_labels: FL.nii.gz,
         moving_labels: ML.nii.gz}
    grid:
      window: [3, 5, 10]
      formats: [[bf16, fp16, fp32, fp64], [fp32, fp64]]
      execution: [native, virtual]

A learning sweep has ``data``, ``dim``, ``steps``, ``learning_config`` and ``seeds`` instead of
``registration_config`` and ``pairs``. The grid's cartesian product times the pairs (or seeds) is
the job list; a grid key left out keeps the base config's value. Every job runs the ``dynomp`` arm
with its settings into ``OUT/runs/<run>/`` (the files `dynomp register` or `dynomp train` write,
plus ``sweep.json`` with the run's parameters). submitit submits the jobs as one Slurm job array,
or runs them as local processes, and ``OUT/sweep_metrics.parquet`` and ``.tsv`` gather the scalar
metrics of every run in one tidy table (run, pair or seed, window, formats, execution, status,
metric, value).
A diverged run is a result: its rows are kept, with NaN where a metric has no value. A run whose
job failed (an exception, a time limit) has no rows; ``OUT/sweep.json`` lists every run with its job
id and status, and the command names each failure in one line and exits 1. Relative paths in the
sweep file are read from the working directory, as in the study configs.

submitit's LocalExecutor starts every job at once; on a laptop that oversubscribes the cores, so
local jobs are submitted one by one, at most ``--max-parallel`` at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from dynomp.atomic import atomic_path, write_json_atomic, write_text_atomic
from dynomp.precision.controller import EXECUTION_MODES
from dynomp.precision.formats import validate_formats
from dynomp.yaml_file import read_yaml

SWEEP_KINDS = ("registration", "learning")
GRID_KEYS = ("window", "formats", "execution")
SWEEP_KEYS = {
    "registration": ("kind", "registration_config", "pairs", "grid"),
    "learning": ("kind", "learning_config", "data", "dim", "steps", "seeds", "grid"),
}
PAIR_KEYS = ("name", "fixed", "moving", "fixed_labels", "moving_labels")
EXECUTORS = ("auto", "slurm", "local")
TABLE_COLUMNS = {
    "registration": ("run", "pair", "window", "formats", "execution", "status", "metric", "value"),
    "learning": ("run", "seed", "window", "formats", "execution", "status", "metric", "value"),
}
# metrics.json numbers that describe the run, not its outcome
SETTING_KEYS = ("threads", "diverged_at")
# outcome metrics that stay in the table as NaN when a run has no value for them (a diverged run)
RESULT_METRICS = (
    "dice_mean",
    "jaccard_mean",
    "ncc",
    "nmi",
    "jacobian_nonpositive_percent",
    "sd_log_jacobian",
    "final_loss_total",
)
# the last line of a Python traceback: "ValueError: message"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(:|$)")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# how often a forced sacct query looks for jobs that ended without a result (killed, cancelled)
FORCED_CHECK_SECONDS = 30.0


@dataclass(frozen=True)
class SweepJob:
    """One run of the sweep: everything a job process needs, picklable for submitit."""

    kind: str
    run: str
    out: str
    window: int
    formats: tuple[str, ...]
    execution: str
    threads: int = 1
    pair: str | None = None
    fixed: str | None = None
    moving: str | None = None
    fixed_labels: str | None = None
    moving_labels: str | None = None
    registration_config: str | None = None
    seed: int | None = None
    data: str | None = None
    dim: int | None = None
    steps: int | None = None
    learning_config: str | None = None

    def parameters(self) -> dict[str, Any]:
        """The run's settings as plain data (sweep.json)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
            if value is not None
        }


@dataclass(frozen=True)
class JobOutcome:
    """What became of one submitted run: its Slurm (or process) id and an error, if it failed."""

    run: str
    job_id: str
    error: str | None = None
    stderr: str | None = None


@dataclass(frozen=True)
class SweepResult:
    """The table written and what became of every job."""

    table: pd.DataFrame
    outcomes: list[JobOutcome]
    executor: str

    @property
    def failures(self) -> list[JobOutcome]:
        """The jobs that ended without results."""
        return [outcome for outcome in self.outcomes if outcome.error is not None]


# -- the sweep file ------------------------------------------------------------------------------


def _check_keys(data: Any, known: tuple[str, ...], *, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")


def _non_empty_list(value: Any, *, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list, got {value!r}")
    return value


def _existing_file(value: Any, *, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a file path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {value} not found")
    return str(path.resolve())


def _positive_int(value: Any, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: must be an integer >= 1, got {value!r}")
    return value


def _read_grid(grid: Any, *, source: str) -> dict[str, list]:
    """The grid's axes, validated: windows, canonical format sets, execution modes."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(
            f"{source}: grid: at least one of {', '.join(GRID_KEYS)} is needed, got {grid!r}"
        )
    _check_keys(grid, GRID_KEYS, where=f"{source}: grid")
    axes: dict[str, list] = {}
    if "window" in grid:
        windows = _non_empty_list(grid["window"], where=f"{source}: grid.window")
        axes["window"] = [
            _positive_int(window, where=f"{source}: grid.window[{index}]")
            for index, window in enumerate(windows)
        ]
    if "formats" in grid:
        format_sets = _non_empty_list(grid["formats"], where=f"{source}: grid.formats")
        axes["formats"] = []
        for index, names in enumerate(format_sets):
            where = f"{source}: grid.formats[{index}]"
            if not isinstance(names, list):
                raise ValueError(f"{where}: expected a list of format names, got {names!r}")
            axes["formats"].append(validate_formats(names, argument=where))
    if "execution" in grid:
        modes = _non_empty_list(grid["execution"], where=f"{source}: grid.execution")
        for index, mode in enumerate(modes):
            if mode not in EXECUTION_MODES:
                raise ValueError(
                    f"{source}: grid.execution[{index}]: unknown mode {mode!r} "
                    f"(known: {', '.join(EXECUTION_MODES)})"
                )
        axes["execution"] = list(modes)
    for key, values in axes.items():
        if len(set(values)) != len(values):
            raise ValueError(f"{source}: grid.{key}: a value appears twice in {grid[key]!r}")
    return axes


def _run_label(window: int, formats: tuple[str, ...], execution: str) -> str:
    return f"w{window}_{'-'.join(formats)}_{execution}"


def load_sweep(
    path: str | os.PathLike, *, out: str | os.PathLike, threads: int = 1
) -> list[SweepJob]:
    """Read and validate a sweep file; return its jobs (file paths made absolute)."""
    source = Path(path)
    data = read_yaml(source, kind="sweep file")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")
    kind = data.get("kind")
    if kind not in SWEEP_KINDS:
        raise ValueError(f"{source}: kind: expected one of {', '.join(SWEEP_KINDS)}, got {kind!r}")
    _check_keys(data, SWEEP_KEYS[kind], where=str(source))
    if "grid" not in data:
        raise ValueError(f"{source}: grid: required")
    axes = _read_grid(data["grid"], source=str(source))
    runs_folder = Path(out).resolve() / "runs"
    make_jobs = _registration_jobs if kind == "registration" else _learning_jobs
    return make_jobs(data, axes=axes, source=source, runs_folder=runs_folder, threads=threads)


def _registration_jobs(data: dict, *, axes: dict[str, list], source: Path, runs_folder: Path,
                       threads: int) -> list[SweepJob]:
    """The registration sweep's jobs: every pair with every grid point."""
    from dynomp.registration.config import load_config as load_registration_config

    config_path = data.get("registration_config")
    if config_path is not None:
        config_path = _existing_file(config_path, where=f"{source}: registration_config")
    base = load_registration_config(config_path)
    default = base.precision
    settings = _settings(axes, window=default.window, formats=default.formats,
                         execution=default.execution)
    for window, formats, execution in settings:
        try:
            dataclasses.replace(default, window=window, formats=formats, execution=execution)
        except ValueError as error:
            raise ValueError(f"{source}: grid: {error}") from None
    pairs = _non_empty_list(data.get("pairs"), where=f"{source}: pairs")
    named_pairs = []
    for index, pair in enumerate(pairs):
        where = f"{source}: pairs[{index}]"
        _check_keys(pair, PAIR_KEYS, where=where)
        for key in ("fixed", "moving"):
            if key not in pair:
                raise ValueError(f"{where}.{key}: required")
        name = str(pair.get("name", f"pair{index + 1:02d}"))
        if not RUN_NAME.match(name):
            raise ValueError(f"{where}.name: {name!r} is not a plain file name")
        files = {
            key: _existing_file(pair[key], where=f"{where}.{key}")
            for key in PAIR_KEYS[1:]
            if pair.get(key) is not None
        }
        named_pairs.append((name, files))
    names = [name for name, _ in named_pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: pairs: two pairs have the same name ({', '.join(names)})")
    jobs = []
    for (name, files), (window, formats, execution) in itertools.product(named_pairs, settings):
        run = f"{name}_{_run_label(window, formats, execution)}"
        jobs.append(SweepJob(
            kind="registration", run=run, out=str(runs_folder / run), window=window,
            formats=formats, execution=execution, threads=threads, pair=name,
            registration_config=config_path, **files,
        ))
    return jobs


def _learning_jobs(data: dict, *, axes: dict[str, list], source: Path, runs_folder: Path,
                   threads: int) -> list[SweepJob]:
    """The learning sweep's jobs: every seed with every grid point."""
    from dynomp.learning.config import load_config as load_learning_config

    config_path = data.get("learning_config")
    if config_path is not None:
        config_path = _existing_file(config_path, where=f"{source}: learning_config")
    folder = data.get("data")
    if folder is None:
        raise ValueError(f"{source}: data: required (the dataset directory to train on)")
    if not isinstance(folder, str) or not Path(folder).expanduser().is_dir():
        raise FileNotFoundError(f"{source}: data: dataset directory {folder!r} not found")
    folder = str(Path(folder).expanduser().resolve())
    dim = data.get("dim")
    if dim is not None and dim not in (2, 3):
        raise ValueError(f"{source}: dim: must be 2 or 3, got {dim!r}")
    steps = data.get("steps")
    if steps is not None:
        _positive_int(steps, where=f"{source}: steps")
    seeds = _non_empty_list(data.get("seeds", [0]), where=f"{source}: seeds")
    for index, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{source}: seeds[{index}]: must be an integer >= 0, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{source}: seeds: a seed appears twice in {seeds!r}")
    try:
        base = load_learning_config(config_path, arm="dynomp", dim=dim, steps=steps)
    except ValueError as error:
        raise ValueError(f"{source}: learning_config: {error}") from None
    settings = _settings(axes, window=base.window, formats=base.formats, execution=base.execution)
    jobs = []
    for seed, (window, formats, execution) in itertools.product(seeds, settings):
        run = f"seed{seed}_{_run_label(window, formats, execution)}"
        jobs.append(SweepJob(
            kind="learning", run=run, out=str(runs_folder / run), window=window, formats=formats,
            execution=execution, threads=threads, seed=seed, data=folder, dim=dim, steps=steps,
            learning_config=config_path,
        ))
    return jobs


def _settings(axes: dict[str, list], *, window: int, formats: tuple[str, ...],
              execution: str) -> list[tuple[int, tuple[str, ...], str]]:
    """The grid's cartesian product; an axis left out keeps the base config's value."""
    return list(itertools.product(
        axes.get("window", [window]),
        axes.get("formats", [tuple(formats)]),
        axes.get("execution", [execution]),
    ))


# -- one job -------------------------------------------------------------------------------------


def run_sweep_job(job: SweepJob) -> dict[str, Any]:
    """Run one sweep job in this process (what every submitit job calls); return its status."""
    import torch

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    # metrics.json marks a finished run: one left by an earlier sweep must not outlive a failure
    (out / "metrics.json").unlink(missing_ok=True)
    write_json_atomic(out / "sweep.json", job.parameters())
    torch.set_num_threads(max(1, job.threads))
    if job.kind == "registration":
        from dynomp.registration.config import load_config
        from dynomp.registration.run import register_files

        base = load_config(job.registration_config)
        precision = dataclasses.replace(
            base.precision, window=job.window, formats=job.formats, execution=job.execution
        )
        metrics = register_files(
            fixed=job.fixed, moving=job.moving, fixed_labels=job.fixed_labels,
            moving_labels=job.moving_labels, arm="dynomp", out=out,
            config=dataclasses.replace(base, precision=precision), threads=job.threads,
        )
        return {"run": job.run, "status": metrics["status"]}
    from dynomp.learning.config import load_config
    from dynomp.learning.train import train

    config = load_config(
        job.learning_config, arm="dynomp", formats=job.formats, window=job.window,
        execution=job.execution, dim=job.dim, steps=job.steps, seed=job.seed,
    )
    result = train(config, data=job.data, out=out, progress=False)
    return {"run": job.run, "status": result.status}


# -- the table -----------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def run_metrics(job: SweepJob) -> tuple[str, dict[str, float]] | None:
    """(status, scalar metrics) of a finished run from its metrics.json; None when it has none."""
    folder = Path(job.out)
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if key in SETTING_KEYS:
            continue
        number = _number(value)
        if number is not None:
            values[key] = number
        elif value is None and key in RESULT_METRICS:
            values[key] = math.nan
    for stage_level, loss in (metrics.get("final_losses") or {}).items():
        number = _number(loss)
        values[f"final_loss_{stage_level.replace('/', '_')}"] = (
            math.nan if number is None else number
        )
    seconds_by_format = metrics.get("seconds_by_format")
    if seconds_by_format is None and (folder / "trace.parquet").is_file():
        # training traces time every step: the seconds spent in each format are their sums
        trace = pd.read_parquet(folder / "trace.parquet", columns=["format", "step_seconds"])
        seconds_by_format = trace.groupby("format")["step_seconds"].sum().to_dict()
    for name, seconds in (seconds_by_format or {}).items():
        values[f"seconds_in_{name}"] = float(seconds)
    return str(metrics.get("status", "unknown")), values


def sweep_table(jobs: list[SweepJob], *, kind: str) -> pd.DataFrame:
    """One row per run x metric, for every run that has a metrics.json."""
    columns = TABLE_COLUMNS[kind]
    rows = []
    for job in jobs:
        found = run_metrics(job)
        if found is None:
            continue
        status, values = found
        for metric, value in values.items():
            rows.append({
                "run": job.run,
                columns[1]: job.pair if kind == "registration" else job.seed,
                "window": job.window,
                "formats": ",".join(job.formats),
                "execution": job.execution,
                "status": status,
                "metric": metric,
                "value": value,
            })
    table = pd.DataFrame(rows, columns=list(columns))
    table["window"] = table["window"].astype("int64")
    table["value"] = table["value"].astype("float64")
    if kind == "learning":
        table["seed"] = table["seed"].astype("int64")
    return table


def write_table(table: pd.DataFrame, out: Path) -> None:
    """sweep_metrics.parquet and sweep_metrics.tsv, atomically."""
    with atomic_path(out / "sweep_metrics.parquet") as temporary:
        table.to_parquet(temporary, index=False)
    write_text_atomic(out / "sweep_metrics.tsv", table.to_csv(sep="\t", index=False, na_rep="NaN"))


# -- submission ----------------------------------------------------------------------------------


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def slurm_answers() -> bool:
    """Whether sbatch is on PATH and sinfo answers (within 15 s)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15,
                                check=False)
        return answer.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_executor(name: str) -> str:
    """`slurm` or `local`: `auto` is slurm where sbatch is on PATH and sinfo answers."""
    if name not in EXECUTORS:
        raise ValueError(f"--executor: unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    if name == "auto":
        return "slurm" if slurm_answers() else "local"
    if name == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--executor slurm: sbatch is not on PATH")
    return name


def failure_line(error: BaseException) -> str:
    """One line for a failed job: the job's own exception (from the trace submitit relays), or
    submitit's first line (a job killed without a result: time limit, memory, cancelled)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)]
    if raised:
        return raised[-1]
    return lines[0] if lines else type(error).__name__


def _outcome(job: SweepJob, submitted: Any) -> JobOutcome:
    try:
        submitted.result()
    except Exception as error:  # noqa: BLE001 - any failure of a job is reported, not raised
        return JobOutcome(run=job.run, job_id=str(submitted.job_id), error=failure_line(error),
                          stderr=str(submitted.paths.stderr))
    return JobOutcome(run=job.run, job_id=str(submitted.job_id))


def _collect_done(pairs: list[tuple[SweepJob, Any]], *, bar: tqdm,
                  finished: dict[str, JobOutcome]) -> list[tuple[SweepJob, Any]]:
    """Collect the jobs that are done; return those still running."""
    running = []
    for job, submitted in pairs:
        if submitted.done():
            finished[job.run] = _outcome(job, submitted)
            bar.update(1)
        else:
            running.append((job, submitted))
    return running


def submit_jobs(
    jobs: list[SweepJob],
    *,
    executor: str,
    folder: Path,
    partition: str | None = None,
    account: str | None = None,
    max_parallel: int | None = None,
    timeout_min: int = 60,
    cpus_per_task: int = 1,
    mem_gb: float | None = None,
    poll_seconds: float = 2.0,
    progress: bool = True,
) -> list[JobOutcome]:
    """Run the jobs with submitit (one Slurm job array, or local processes); wait for them all."""
    import submitit

    cluster = choose_executor(executor)
    submitit_executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters: dict[str, Any] = {
        "name": "dynomp-sweep",
        "timeout_min": int(timeout_min),
        "cpus_per_task": int(cpus_per_task),
        "mem_gb": mem_gb,
    }
    if cluster == "slurm":
        parameters.update(slurm_partition=partition, slurm_account=account,
                          slurm_array_parallelism=max_parallel)
    submitit_executor.update_parameters(**parameters)
    finished: dict[str, JobOutcome] = {}
    with tqdm(total=len(jobs), desc=f"sweep ({cluster})", unit="run", disable=not progress) as bar:
        if cluster == "slurm":
            running = list(zip(jobs, submitit_executor.map_array(run_sweep_job, jobs), strict=True))
            bar.set_postfix(job=running[0][1].job_id.split("_")[0] if running else "")
            pending: list[SweepJob] = []
            limit = len(jobs)
        else:
            limit = max_parallel or max(1, usable_cpus() // cpus_per_task)
            running, pending = [], list(jobs)
        last_forced = time.monotonic()
        try:
            while running or pending:
                while pending and len(running) < limit:
                    job = pending.pop(0)
                    running.append((job, submitit_executor.submit(run_sweep_job, job)))
                running = _collect_done(running, bar=bar, finished=finished)
                if running and time.monotonic() - last_forced > FORCED_CHECK_SECONDS:
                    # submitit asks sacct rarely; a forced query finds jobs killed without a result
                    running[0][1].done(force_check=True)
                    last_forced = time.monotonic()
                if running or pending:
                    time.sleep(poll_seconds)
        except KeyboardInterrupt:
            # Ctrl-C ends the sweep, not only the wait: cancel the jobs still queued or running
            for _, submitted in running:
                submitted.cancel(check=False)
            raise
    return [finished[job.run] for job in jobs]


def run_sweep(
    config: str | os.PathLike,
    *,
    out: str | os.PathLike,
    executor: str = "auto",
    partition: str | None = None,
    account: str | None = None,
    max_parallel: int | None = None,
    timeout_min: int = 60,
    cpus_per_task: int = 1,
    mem_gb: float | None = 4.0,
    progress: bool = True,
) -> SweepResult:
    """Validate the sweep, run every job, and write the tidy table and sweep.json in `out`."""
    if max_parallel is not None:
        _positive_int(max_parallel, where="--max-parallel")
    _positive_int(timeout_min, where="--timeout-min")
    _positive_int(cpus_per_task, where="--cpus-per-task")
    if mem_gb is not None and not mem_gb > 0:
        raise ValueError(f"--mem-gb: must be > 0, got {mem_gb!r}")
    out = Path(out).resolve()
    jobs = load_sweep(config, out=out, threads=cpus_per_task)
    cluster = choose_executor(executor)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = submit_jobs(
        jobs, executor=cluster, folder=out / "submitit", partition=partition, account=account,
        max_parallel=max_parallel, timeout_min=timeout_min, cpus_per_task=cpus_per_task,
        mem_gb=mem_gb, progress=progress,
    )
    # a failed run's folder may hold the metrics of an earlier sweep: they are not this sweep's
    failed = {outcome.run for outcome in outcomes if outcome.error is not None}
    table = sweep_table([job for job in jobs if job.run not in failed], kind=jobs[0].kind)
    write_table(table, out)
    statuses = table.drop_duplicates("run").set_index("run")["status"].to_dict()
    write_json_atomic(out / "sweep.json", {
        "config": str(Path(config).resolve()),
        "kind": jobs[0].kind,
        "executor": cluster,
        "partition": partition,
        "account": account,
        "runs": [
            {
                "run": outcome.run,
                "job_id": outcome.job_id,
                "status": "failed" if outcome.error else statuses.get(outcome.run, "unknown"),
                **({"error": outcome.error, "stderr": outcome.stderr} if outcome.error else {}),
            }
            for outcome in outcomes
        ],
    })
    return SweepResult(table=table, outcomes=outcomes, executor=cluster)


# -- the command ---------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `dynomp sweep`."""
    parser = subparsers.add_parser(
        "sweep",
        help="controller ablations (window, formats, execution) as a Slurm job array (submitit)",
    )
    parser.add_argument("--config", required=True, type=Path, help="sweep file (YAML)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="slurm, local, or auto: slurm where sbatch and sinfo answer")
    parser.add_argument("--partition", default=None,
                        help="Slurm partition (default: the cluster's)")
    parser.add_argument("--account", default=None, help="Slurm account")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="runs at once (default: Slurm decides; locally, CPUs / cpus-per-task)")
    parser.add_argument("--timeout-min", type=int, default=60,
                        help="time limit of a run in minutes (default 60)")
    parser.add_argument("--cpus-per-task", type=int, default=1,
                        help="CPUs (and torch threads) per run (default 1)")
    parser.add_argument("--mem-gb", type=float, default=4.0,
                        help="memory per run in GB (default 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    """Run the sweep; print the table's path; one line per failed run (exit 1 if any)."""
    result = run_sweep(
        args.config, out=args.out, executor=args.executor, partition=args.partition,
        account=args.account, max_parallel=args.max_parallel, timeout_min=args.timeout_min,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, progress=not args.quiet,
    )
    runs = result.table["run"].nunique()
    print(f"{Path(args.out) / 'sweep_metrics.parquet'}: {runs} run(s) on {result.executor}")
    for failure in result.failures:
        print(f"dynomp sweep: run {failure.run} (job {failure.job_id}) failed: {failure.error} "
              f"(log: {failure.stderr})", file=sys.stderr)
    return 1 if result.failures else 0
