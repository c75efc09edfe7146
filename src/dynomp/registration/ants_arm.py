"""The real ANTs arms: the compiled antsRegistration inside antspyx, `--float 0` or `--float 1`.

The stages, metrics, pyramid and convergence settings come from the same `RegistrationConfig` as
the engine's, translated into antsRegistration's own arguments and passed raw
(`ants.registration([...], None)`), with a fixed `--random-seed`. ANTs runs in a child Python
process so that its thread count (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS) and its verbose output,
which the C++ code prints on the process's standard output, can both be controlled and captured.
The trace is parsed from that output: ANTs prints one `DIAGNOSTIC` line per iteration with the
metric value and the seconds since the previous line. The affine and the SyN warp that ANTs writes are composed into
one displacement field per direction by antsApplyTransforms.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dynomp.registration.config import RegistrationConfig, StageConfig

_CHILD = (
    "import json, sys, ants\n"
    "for call in json.load(open(sys.argv[1])):\n"
    "    if ants.registration(call, None) if call[0] == '--dimensionality' else "
    "ants.internal.get_lib_fn('antsApplyTransforms')(ants.internal.process_arguments(call)):\n"
    "        sys.exit(3)\n"
)
_STAGE_LINE = re.compile(r"^Stage (\d+)\s*$")
_DIAGNOSTIC_LINE = re.compile(r"^\s*\d+DIAGNOSTIC,\s*(\d+),\s*([-+0-9.eEnaNif]+),\s*[^,]+,\s*[^,]+,\s*([-+0-9.eE]+)")


@dataclass
class AntsOutcome:
    """ANTs' transforms as displacement fields (RAS mm), its trace and its status."""

    status: str
    forward_displacement: np.ndarray
    inverse_displacement: np.ndarray
    trace: list[dict[str, Any]]
    final_losses: dict[str, float]
    log: str
    diverged_at: dict[str, Any] | None = None
    warp_dtype: str = "float64"
    extra: dict[str, Any] = field(default_factory=dict)


def _stage_arguments(stage: StageConfig, fixed: str, moving: str) -> list[str]:
    transform = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}[stage.name]
    if stage.name == "syn":
        transform_argument = f"SyN[{stage.learning_rate},{stage.update_sigma:g},{stage.total_sigma:g}]"
    else:
        transform_argument = f"{transform}[{stage.learning_rate}]"
    if stage.metric == "mi":
        metric = f"MI[{fixed},{moving},1,{stage.metric_bins},Regular,{stage.sampling_fraction}]"
    elif stage.metric == "cc":
        metric = f"CC[{fixed},{moving},1,{stage.cc_radius}]"
    else:
        metric = f"MeanSquares[{fixed},{moving},1]"
    return [
        "--transform", transform_argument,
        "--metric", metric,
        "--convergence",
        f"[{'x'.join(str(n) for n in stage.iterations)},{stage.convergence_threshold:g},"
        f"{stage.convergence_window}]",
        "--shrink-factors", "x".join(str(s) for s in stage.shrink_factors),
        "--smoothing-sigmas", "x".join(f"{s:g}" for s in stage.smoothing_sigmas) + "vox",
    ]


def ants_arguments(*, fixed: str, moving: str, prefix: str, config: RegistrationConfig,
                   single_precision: bool) -> list[str]:
    """antsRegistration's raw arguments for the config (the paper's command by default)."""
    arguments = [
        "--dimensionality", "3",
        "--float", "1" if single_precision else "0",
        "--output", f"[{prefix},{prefix}warped.nii.gz]",
        "--interpolation", "Linear",
        "--use-histogram-matching", "0",
        "--random-seed", str(config.seed),
        "--verbose", "1",
    ]
    if config.initialize_center_of_mass:
        arguments += ["--initial-moving-transform", f"[{fixed},{moving},1]"]
    for stage in config.stages:
        arguments += _stage_arguments(stage, fixed, moving)
    return arguments


def parse_trace(log: str, config: RegistrationConfig, *, fmt: str) -> list[dict[str, Any]]:
    """One row per iteration from antsRegistration's verbose output."""
    rows: list[dict[str, Any]] = []
    stage_index, level = -1, -1
    for line in log.splitlines():
        stage_match = _STAGE_LINE.match(line)
        if stage_match:
            stage_index, level = int(stage_match.group(1)), -1
            continue
        if line.lstrip("X").startswith("DIAGNOSTIC,Iteration"):
            level += 1
            continue
        match = _DIAGNOSTIC_LINE.match(line)
        if match and 0 <= stage_index < len(config.stages):
            rows.append({
                "stage": config.stages[stage_index].name,
                "level": level,
                "iteration": int(match.group(1)) - 1,
                "loss": float(match.group(2)),
                "pmin": math.nan,
                "pmin_smoothed": math.nan,
                "format": fmt,
                "seconds": float(match.group(3)),
            })
    return rows


def _ras_displacement(path: Path) -> np.ndarray:
    """An ITK displacement field file (LPS) as an array (*grid, 3) of RAS displacements."""
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
    data = data.reshape(*data.shape[:3], 3) * np.array([-1.0, -1.0, 1.0])
    return data


def run_ants(*, fixed: str | Path, moving: str | Path, config: RegistrationConfig, arm: str,
             threads: int = 2) -> AntsOutcome:
    """Run antsRegistration for `arm` (ants-fp64 or ants-fp32) on two NIfTI files."""
    if arm not in ("ants-fp64", "ants-fp32"):
        raise ValueError(f"arm: {arm!r} is not an ANTs arm (known: ants-fp64, ants-fp32)")
    single = arm == "ants-fp32"
    with tempfile.TemporaryDirectory(prefix="dynomp-ants-") as work:
        prefix = str(Path(work) / "out_")
        fixed, moving = str(fixed), str(moving)
        has_syn = any(stage.name == "syn" for stage in config.stages)
        float_flag = ["--float", "1" if single else "0"]
        affine_file = f"{prefix}0GenericAffine.mat"
        forward_list = (["-t", f"{prefix}1Warp.nii.gz"] if has_syn else []) + ["-t", affine_file]
        inverse_list = ["-t", f"[{affine_file},1]"] + (
            ["-t", f"{prefix}1InverseWarp.nii.gz"] if has_syn else []
        )
        calls = [
            ants_arguments(fixed=fixed, moving=moving, prefix=prefix, config=config,
                           single_precision=single),
            ["-d", "3", "-r", fixed, "-o", f"[{work}/forward.nii.gz,1]", *forward_list, *float_flag],
            ["-d", "3", "-r", moving, "-o", f"[{work}/inverse.nii.gz,1]", *inverse_list, *float_flag],
        ]
        calls_file = Path(work) / "calls.json"
        calls_file.write_text(json.dumps(calls))
        environment = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
        completed = subprocess.run(
            [sys.executable, "-c", _CHILD, str(calls_file)], capture_output=True, text=True,
            env=environment, check=False,
        )
        log = completed.stdout + completed.stderr
        trace = parse_trace(log, config, fmt="fp32" if single else "fp64")
        final_losses: dict[str, float] = {}
        for row in trace:
            final_losses[f"{row['stage']}/{row['level']}"] = row["loss"]
        diverged = next((row for row in trace if not math.isfinite(row["loss"])), None)
        if completed.returncode != 0 and diverged is None:
            last_line = (log.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"antsRegistration failed (exit {completed.returncode}): {last_line}")
        forward = _ras_displacement(Path(work) / "forward.nii.gz")
        inverse = _ras_displacement(Path(work) / "inverse.nii.gz")
        own_warp = Path(f"{prefix}1Warp.nii.gz")
        warp_dtype = str(nib.load(str(own_warp)).get_data_dtype()) if own_warp.exists() else None
    return AntsOutcome(
        status="diverged" if diverged else "completed",
        forward_displacement=forward,
        inverse_displacement=inverse,
        trace=trace,
        final_losses=final_losses,
        log=log,
        diverged_at=(
            {k: diverged[k] for k in ("stage", "level", "iteration")} if diverged else None
        ),
        warp_dtype="float32" if single else "float64",
        extra={"ants_warp_dtype": warp_dtype},
    )
