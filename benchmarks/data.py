"""Benchmark of the data layer: embedded cohort build, TemplateFlow home, DataLad clone + get.

    .venv/bin/python benchmarks/data.py [--subjects 8] [--resolution 2] [--repeats 3]
        [--out results/benchmarks/data.json]

Each measurement runs in a fresh child process (`--run-step`), so that the template's in-process
cache does not make later runs look faster than a user's first `dynomp cohort`:

1. `cohort`: build_cohort(subjects, resolution) with its DataLad save (the issue's target: under
   60 s for 8 subjects at 2 mm), split into preparing the template and head model, the subjects,
   and the DataLad create + save;
2. `template`: build_template_home (res-01 and res-02);
3. `fetch`: datalad clone of that cohort from its path, then get of two subjects' T1w images.

Wall times are medians over `repeats` runs; the JSON keeps every run. The machine's load average
is recorded before and after, since this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_cohort(folder: Path, *, subjects: int, resolution: float) -> dict:
    """Build the cohort, timing its three phases."""
    import numpy as np

    from dynomp.data import cohort as cohort_module
    from dynomp.data.sources import save_as_dataset

    phases: dict[str, float] = {}
    start = time.perf_counter()
    template = cohort_module.template_at_resolution(resolution)
    head = cohort_module.build_head_model(template)
    phases["template_and_head_s"] = time.perf_counter() - start

    # the same steps as build_cohort, timed one by one
    root = folder / "cohort"
    settings = cohort_module.CohortSettings()
    generators = [
        np.random.default_rng(sequence) for sequence in np.random.SeedSequence(0).spawn(subjects)
    ]
    started = time.perf_counter()
    rows = [
        cohort_module._write_subject(
            root, index=index, template=template, head=head, rng=generator, settings=settings
        )
        for index, generator in enumerate(generators)
    ]
    cohort_module._write_dataset_files(
        root, rows=rows, subjects=subjects, resolution=resolution, seed=0
    )
    phases["subjects_s"] = time.perf_counter() - started
    started = time.perf_counter()
    save_as_dataset(root, message="benchmark")
    phases["datalad_save_s"] = time.perf_counter() - started
    phases["total_s"] = time.perf_counter() - start

    # and the public function end to end, which is what `dynomp cohort` runs
    from dynomp.data import templates

    templates._template_at_resolution.cache_clear()
    started = time.perf_counter()
    cohort_module.build_cohort(folder / "public", subjects=subjects, resolution=resolution, seed=0)
    phases["build_cohort_s"] = time.perf_counter() - started
    # annexed images are symlinks into .git/annex: count each file once, where its bytes are
    size = sum(
        path.stat().st_size
        for path in (folder / "public").rglob("*")
        if path.is_file() and not path.is_symlink()
    )
    phases["dataset_megabytes"] = size / 1e6
    return phases


def run_template(folder: Path) -> dict:
    """Build a TemplateFlow home."""
    from dynomp.data.templates import build_template_home

    started = time.perf_counter()
    build_template_home(folder / "home")
    return {"build_template_home_s": time.perf_counter() - started}


def run_fetch(folder: Path, *, subjects: int, resolution: float) -> dict:
    """Clone a freshly built cohort from its path and get (up to) two subjects' T1w images."""
    from dynomp.data.cohort import build_cohort
    from dynomp.data.sources import fetch

    source = build_cohort(folder / "source", subjects=subjects, resolution=resolution, seed=0)
    started = time.perf_counter()
    fetched = fetch(
        str(source),
        dest=folder / "clone",
        subjects=[f"{index + 1:02d}" for index in range(min(2, subjects))],
    )
    return {"clone_and_get_s": time.perf_counter() - started, "files": len(fetched)}


def run_step(step: str, *, subjects: int, resolution: float) -> dict:
    """One measurement in this (fresh) process, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="dynomp-data-benchmark-") as temporary:
        folder = Path(temporary)
        if step == "cohort":
            return run_cohort(folder, subjects=subjects, resolution=resolution)
        if step == "template":
            return run_template(folder)
        if step == "fetch":
            return run_fetch(folder, subjects=subjects, resolution=resolution)
    raise ValueError(f"--run-step: unknown step {step!r}")


def main() -> None:
    """Run every step `repeats` times, each in a child process; print a Markdown table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/data.json"))
    parser.add_argument(
        "--run-step", choices=("cohort", "template", "fetch"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.run_step:
        print(
            json.dumps(run_step(args.run_step, subjects=args.subjects, resolution=args.resolution))
        )
        return

    environment = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
    }
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"cohort": [], "template": [], "fetch": []}
    for _ in range(args.repeats):
        for step, step_runs in runs.items():
            completed = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--run-step",
                    step,
                    "--subjects",
                    str(args.subjects),
                    "--resolution",
                    str(args.resolution),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=environment,
            )
            step_runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()

    medians = {
        step: {
            key: statistics.median(run[key] for run in step_runs)
            for key in step_runs[0]
            if isinstance(step_runs[0][key], float)
        }
        for step, step_runs in runs.items()
    }
    print(f"| measurement ({args.subjects} subjects at {args.resolution:g} mm) | median s |")
    print("|---|---:|")
    for step, values in medians.items():
        for key, value in values.items():
            print(f"| {step}: {key} | {value:.2f} |")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")

    from dynomp.atomic import write_json_atomic

    write_json_atomic(
        args.out,
        {
            "subjects": args.subjects,
            "resolution_mm": args.resolution,
            "repeats": args.repeats,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "load_average_before": load_before[0],
            "load_average_after": load_after[0],
            "medians": medians,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
