"""Benchmark of the workflow's scale: how long `snakemake -n` takes to build a study's DAG.

    .venv/bin/python benchmarks/workflow.py [--subjects 100 300 1000] [--repeats 3]
        [--out results/benchmarks/workflow.json]

For each subject count, a study config like configs/default.yaml with the embedded source, six
registration arms (ants-fp64, fp64, fp32, bf16, fp16, dynomp) and six learning arms is written to a
temporary folder, and `snakemake -n --cores 2` is run on it in a fresh process (Python start-up,
Snakefile parsing, config validation and the DAG: everything a user waits for). The issue's target:
1000 subjects x 6 arms within 30 s. Wall times are medians over `repeats` runs; the JSON keeps
every run and the machine's load average, since this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
REGISTRATION_ARMS = ["ants-fp64", "fp64", "fp32", "bf16", "fp16", "dynomp"]


def study_config(subjects: int, results: Path) -> dict:
    """The default study, scaled to `subjects` subjects and six registration arms."""
    config = yaml.safe_load((REPOSITORY / "configs" / "default.yaml").read_text())
    config["study"] = f"scale-{subjects}"
    config["results"] = str(results)
    config["data"]["subjects"] = subjects
    config["registration"]["arms"] = REGISTRATION_ARMS
    return config


def dry_run(subjects: int) -> dict:
    """One timed `snakemake -n` of a `subjects`-subject study; returns seconds and the job count."""
    with tempfile.TemporaryDirectory(prefix="dynomp-dag-") as folder:
        config_path = Path(folder) / "study.yaml"
        config_path.write_text(yaml.safe_dump(study_config(subjects, Path(folder) / "results")))
        environment = dict(os.environ)
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "rules",
             "--configfile", str(config_path)],
            cwd=REPOSITORY, env=environment, capture_output=True, text=True, check=False,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"snakemake -n failed for {subjects} subjects:\n{result.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)$", result.stdout, flags=re.MULTILINE)
    return {"seconds": seconds, "jobs": int(total.group(1)) if total else None}


def main() -> int:
    """Time the dry runs and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/workflow.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    for subjects in args.subjects:
        runs = [dry_run(subjects) for _ in range(args.repeats)]
        median = statistics.median(run["seconds"] for run in runs)
        rows.append({"subjects": subjects, "registration_arms": len(REGISTRATION_ARMS),
                     "jobs": runs[0]["jobs"], "median_seconds": median,
                     "seconds": [run["seconds"] for run in runs]})
        print(f"{subjects:5d} subjects x {len(REGISTRATION_ARMS)} arms: {runs[0]['jobs']} jobs, "
              f"snakemake -n {median:.1f} s (median of {args.repeats})")
    result = {"rows": rows, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "machine": platform.platform(),
              "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
