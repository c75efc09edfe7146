"""Run Snakemake on the repository's Snakefile, and a tiny study that runs end to end in minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def snakemake(*arguments: str, cwd: Path = REPOSITORY, env: dict | None = None,
              timeout: float = 1800) -> subprocess.CompletedProcess:
    """`snakemake ARGUMENTS` with this interpreter's bin/ first on PATH (where `dynomp` is)."""
    environment = dict(os.environ if env is None else env)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPOSITORY / "Snakefile"),
         "--directory", str(cwd), *arguments],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout, check=False,
    )


def dynomp(*arguments: str, env: dict) -> subprocess.CompletedProcess:
    """`dynomp ARGUMENTS`, this interpreter's console script, in a child process."""
    return subprocess.run([str(Path(sys.executable).parent / "dynomp"), *arguments], env=env,
                          capture_output=True, text=True, check=False, timeout=120)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run, as {rule: count}."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    for line in lines[start + 3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if match is None:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def tiny_config(root: Path, **changes) -> dict:
    """A study small enough to run in the test suite: 3 subjects at 6 mm, two arms of each kind."""
    config = {
        "study": "tiny",
        "results": str(root / "results"),
        "seed": 0,
        "data": {"source": "embedded", "subjects": 3, "resolution": 6.0,
                 "also": ["derivatives/truth"], "labels": "truth"},
        "template": {"name": "MNI152NLin2009aSym", "resolution": 2, "labels": True},
        "brain_extraction": {"iterations": 200},
        "registration": {"arms": ["fp64", "dynomp"],
                         "config": str(HERE / "tiny-registration.yaml")},
        "learning": {"arms": ["fp32", "dynomp"], "dims": [2], "steps": 4,
                     "config": str(HERE / "tiny-learning.yaml")},
        "report": {"baseline": "fp64"},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    """The config as a YAML file."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory):
    """The tiny study, run once to completion with `snakemake --cores 2`."""
    root = tmp_path_factory.mktemp("tiny-study")
    config = write_config(root / "tiny.yaml", tiny_config(root))
    result = snakemake("--cores", "2", "--configfile", str(config), cwd=root)
    if result.returncode != 0:
        logs = "\n".join(
            f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(root.rglob("*.log"))
        )
        raise AssertionError(f"tiny study failed:\n{result.stderr[-6000:]}\n{logs}")
    return {"root": root, "config": config, "study": root / "results" / "tiny", "run": result}
