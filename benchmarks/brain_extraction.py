"""Brain extraction on the embedded cohort: Dice against the true mask and wall time per 2 mm subject.

    .venv/bin/python benchmarks/brain_extraction.py [--subjects 8] [--thresholds 0.5 0.6 0.7]
        [--real-head PATH --real-reference PATH]

Builds the cohort (2 mm, seed 0) in a temporary folder and runs BET on every subject, once per
fractional threshold, each in this process with 2 threads. The numba functions of brainextractor are
compiled (and cached) by a warm-up run on the first subject, which is not timed. With --real-head,
the same is done on a real whole-head scan, scored against a reference brain mask on its grid.
Writes results/benchmarks/brain_extraction.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

# thread limits must be set before numpy/numba load
for variable in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "2")

import numpy as np

from dynomp.atomic import write_json_atomic
from dynomp.data.cohort import build_cohort
from dynomp.data.nifti import read_volume
from dynomp.evaluate.overlap import mask_dice
from dynomp.preprocess.brain_extraction import extract_brain


def _score(
    t1_path: Path, reference_path: Path, *, thresholds: list[float], name: str
) -> list[dict]:
    """Extract the brain at each threshold; one row per threshold with Dice, volumes and seconds."""
    t1 = read_volume(t1_path)
    reference = read_volume(reference_path, labels=True)
    if reference.shape != t1.shape:
        raise ValueError(
            f"{reference_path}: shape {reference.shape} differs from {t1_path}'s {t1.shape}"
        )
    voxel_ml = abs(float(np.linalg.det(t1.affine[:3, :3]))) / 1000.0
    rows = []
    for threshold in thresholds:
        result = extract_brain(t1, fractional_threshold=threshold)
        rows.append(
            {
                "image": name,
                "fractional_threshold": threshold,
                "dice": mask_dice(result.mask, reference.data),
                "volume_ml": result.volume_ml,
                "reference_volume_ml": float((reference.data > 0).sum()) * voxel_ml,
                "seconds": result.seconds,
            }
        )
        print(
            f"{name} f={threshold}: Dice {rows[-1]['dice']:.4f}, {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return rows


def main() -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--real-head", type=Path, help="a real whole-head T1w NIfTI")
    parser.add_argument(
        "--real-reference", type=Path, help="a reference brain mask on the real head's grid"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/benchmarks/brain_extraction.json")
    )
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        root = build_cohort(
            Path(folder) / "cohort", subjects=args.subjects, resolution=2.0, seed=0, datalad=False
        )
        extract_brain(read_volume(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"), iterations=2)
        for index in range(1, args.subjects + 1):
            subject = f"{index:02d}"
            rows += _score(
                root / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz",
                root
                / "derivatives"
                / "truth"
                / f"sub-{subject}"
                / "anat"
                / f"sub-{subject}_desc-brain_mask.nii.gz",
                thresholds=args.thresholds,
                name=f"cohort sub-{subject}",
            )
    if args.real_head is not None:
        if args.real_reference is None:
            raise SystemExit("--real-reference is needed with --real-head")
        rows += _score(
            args.real_head,
            args.real_reference,
            thresholds=args.thresholds,
            name=args.real_head.name,
        )
    write_json_atomic(
        args.out,
        {
            "machine": {
                "cores": os.cpu_count(),
                "platform": platform.platform(),
                "load_average": os.getloadavg(),
            },
            "rows": rows,
        },
    )
    print("| image | fractional threshold | Dice | volume ml | reference ml | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['image']} | {row['fractional_threshold']} | {row['dice']:.4f} | {row['volume_ml']:.1f} "
            f"| {row['reference_volume_ml']:.1f} | {row['seconds']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
