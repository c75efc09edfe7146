"""`dynomp demo`: the main job on the embedded default, end to end, in a few minutes on 2 cores.

The same code paths a study runs, in order, into one output folder (default ``results/demo``):

1. ``precision/``: the DynoMP controller on a real training loop (a small MLP on scikit-learn's
   bundled digits), fixed fp32 against ``dynomp`` in virtual execution, so that the formats it picks
   are the formats it computes in: ``trace.parquet`` and ``summary.json``.
2. ``sources/cohort``: the embedded cohort (whole-head subjects with known warps), saved as a
   DataLad dataset, and ``templateflow/``: a TemplateFlow home with MNI152NLin2009aSym.
3. ``data/``: the cohort cloned with ``datalad clone`` and its T1w images fetched with
   ``datalad get``, as a cluster fetches a real dataset; then BET brain extraction of every subject
   into ``data/derivatives/dynomp``.
4. ``registration/sub-XX/ARM``: each subject's brain registered to the template (fetched through
   ``templateflow.api.get``) with every registration arm: warped images and labels, warps,
   trace.parquet and metrics.json (Dice against the template's labels, Jacobian, time, memory).
5. ``learning/ARM``: VoxelMorph trained in 2D on the cohort's affinely aligned images under each
   learning arm, then evaluated on held-out pairs (``evaluation.parquet``).
6. ``summary.tsv``: one row per stage x subject x arm, printed as a table at the end.

The real ANTs arms (``ants-fp64``, ``ants-fp32``) take minutes per subject here; add them with
``--registration-arms``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from tqdm import tqdm

from dynomp.atomic import atomic_path, write_json_atomic
from dynomp.precision import PrecisionController

DEMO_FORMATS = ("bf16", "fp16", "fp24", "fp32")
REGISTRATION_ARMS = ("fp64", "fp32", "dynomp")
LEARNING_ARMS = ("fp32", "amp-bf16", "bf16", "dynomp")
MARKER = "demo.json"  # marks a folder the demo made, so a rerun may replace it


def digits_split(seed: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], split 80/20 with a fixed seed."""
    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return features[train], labels[train], features[test], labels[test]


def train_digits(*, arm: str, steps: int, seed: int) -> tuple[list[dict], float]:
    """Train the MLP under `arm` (fp32 or dynomp); return the per-step trace and test accuracy."""
    train_x, train_y, test_x, test_y = digits_split(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    controller = PrecisionController(
        DEMO_FORMATS if arm == "dynomp" else ("fp32",), window=5, execution="virtual"
    )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for step in tqdm(range(1, steps + 1), desc=f"digits {arm}", leave=False):
        start = time.perf_counter()
        batch = torch.randint(0, len(train_y), (128,), generator=generator)
        with controller.context():
            logits = model(controller.cast(train_x[batch]))
            loss = torch.nn.functional.cross_entropy(logits, train_y[batch])
            loss.backward()
        controller.optimizer_step(optimizer)
        parameters = list(model.parameters())
        fmt = controller.observe(parameters, [p.grad for p in parameters])
        controller.apply(model, optimizer, fmt)
        optimizer.zero_grad(set_to_none=True)
        rows.append(
            {"arm": arm, "step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - start,
             **{k: v for k, v in controller.trace[-1].items() if k != "step"}}
        )
    with torch.no_grad(), controller.context():
        predicted = model(controller.cast(test_x)).argmax(1)
    accuracy = float((predicted == test_y).double().mean())  # outside the emulated format
    return rows, accuracy


def run_precision_stage(out: Path, *, steps: int, seed: int) -> dict:
    """Stage 1: fp32 against dynomp on digits; writes the trace and a summary."""
    summary = {}
    rows = []
    for arm in ("fp32", "dynomp"):
        arm_rows, accuracy = train_digits(arm=arm, steps=steps, seed=seed)
        rows.extend(arm_rows)
        formats = pd.Series([row["format"] for row in arm_rows]).value_counts()
        summary[arm] = {
            "test_accuracy": accuracy,
            "final_loss": float(np.mean([row["loss"] for row in arm_rows[-20:]])),
            "steps_per_format": {str(k): int(v) for k, v in formats.items()},
        }
    with atomic_path(out / "precision" / "trace.parquet") as temporary:
        pd.DataFrame(rows).to_parquet(temporary, index=False)
    write_json_atomic(out / "precision" / "summary.json", summary)
    return summary


def run_data_stage(out: Path, *, subjects: int, resolution: float, seed: int) -> dict[str, Path]:
    """Stages 2-3: cohort, TemplateFlow home, DataLad clone + get, brain extraction."""
    from dynomp.data.cohort import build_cohort
    from dynomp.data.sources import fetch
    from dynomp.data.templates import build_template_home, get_template
    from dynomp.preprocess.brain_extraction import extract_brain_dataset

    source = build_cohort(out / "sources" / "cohort", subjects=subjects, resolution=resolution,
                          seed=seed)
    home = build_template_home(out / "templateflow")
    data = out / "data"
    fetch(str(source), dest=data, extra_paths=["derivatives/truth"])
    extract_brain_dataset(data, progress=True)
    return {
        "data": data,
        "template": Path(get_template(home, resolution=2, suffix="T1w", desc="brain",
                                      extension=".nii.gz")),
        "template_labels": Path(get_template(home, resolution=2, suffix="dseg",
                                             extension=".nii.gz")),
    }


def run_registration_stage(out: Path, *, paths: dict[str, Path], subjects: list[str],
                           arms: tuple[str, ...]) -> list[dict]:
    """Stage 4: every subject's brain to the template, with every arm (quick schedule)."""
    from dynomp.registration.config import quick_config
    from dynomp.registration.run import register_files

    rows = []
    jobs = [(subject, arm) for subject in subjects for arm in arms]
    for subject, arm in tqdm(jobs, desc="registration", unit="job"):
        anat = f"sub-{subject}/anat/sub-{subject}"
        metrics = register_files(
            fixed=paths["template"],
            moving=paths["data"] / "derivatives" / "dynomp" / f"{anat}_desc-brain_T1w.nii.gz",
            fixed_labels=paths["template_labels"],
            moving_labels=paths["data"] / "derivatives" / "truth" / f"{anat}_dseg.nii.gz",
            arm=arm,
            out=out / "registration" / f"sub-{subject}" / arm,
            config=quick_config(),
        )
        rows.append({
            "stage": "registration", "subject": subject, "arm": arm, "status": metrics["status"],
            "dice_mean": metrics.get("dice_mean"),
            "jacobian_nonpositive_percent": metrics["jacobian_nonpositive_percent"],
            "seconds": metrics.get("wall_seconds"),
            "formats": ", ".join(f"{k} {v:.1f}s" for k, v in metrics["seconds_by_format"].items()),
        })
    return rows


def run_learning_stage(out: Path, *, data: Path, arms: tuple[str, ...], steps: int,
                       seed: int) -> list[dict]:
    """Stage 5: VoxelMorph in 2D under each arm, then its held-out evaluation."""
    from dynomp.learning.config import load_config
    from dynomp.learning.evaluate import evaluate_model
    from dynomp.learning.train import train

    rows = []
    for arm in arms:
        config = load_config(None, arm=arm, task="registration", dim=2, steps=steps,
                             batch_size=4, nb_features=(8, 8, 8, 8), checkpoint_every=steps,
                             seed=seed)
        run = out / "learning" / arm
        start = time.perf_counter()
        result = train(config, data=data, out=run, progress=True)
        seconds = time.perf_counter() - start
        dice = folding = float("nan")
        if result.status == "completed":
            table = evaluate_model(run=run, data=data, out=run / "evaluation.parquet")
            dice = float(table.loc[table["metric"] == "dice", "value"].mean())
            folding = float(
                table.loc[table["metric"] == "jacobian_nonpositive_percent", "value"].mean()
            )
        formats = pd.read_parquet(run / "trace.parquet")["format"].value_counts()
        rows.append({"stage": "learning (2D VoxelMorph)", "subject": "held-out", "arm": arm,
                     "status": result.status, "dice_mean": dice,
                     "jacobian_nonpositive_percent": folding, "seconds": seconds,
                     "formats": ", ".join(f"{k} {v}" for k, v in formats.items())})
    return rows


def prepare_output(out: Path) -> None:
    """Start from an empty folder; replace an earlier demo's output, refuse anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"--out: {out} is not empty and was not made by dynomp demo")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `dynomp demo`."""
    parser = subparsers.add_parser("demo", help="run the main job on the embedded default")
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=300,
                        help="steps per arm of the precision stage (default 300)")
    parser.add_argument("--subjects", type=int, default=3, help="cohort subjects (default 3)")
    parser.add_argument("--registered-subjects", type=int, default=2,
                        help="subjects registered with every arm (default 2)")
    parser.add_argument("--resolution", type=float, default=3.0, help="cohort voxel size, mm")
    parser.add_argument("--registration-arms", default=",".join(REGISTRATION_ARMS),
                        help="comma-separated registration arms (add ants-fp64 for the real ANTs)")
    parser.add_argument("--learning-arms", default=",".join(LEARNING_ARMS),
                        help="comma-separated learning arms")
    parser.add_argument("--learning-steps", type=int, default=150,
                        help="training steps per learning arm (default 150)")
    parser.add_argument("--stages", default="precision,data,registration,learning",
                        help="comma-separated stages to run (data is needed by the later two)")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    parser.set_defaults(handler=run_demo)


def _split(value: str, *, option: str, known: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def run_demo(args: argparse.Namespace) -> int:
    """Run every stage, write summary.tsv and print where the results are."""
    from dynomp.learning.strategies import STRATEGIES
    from dynomp.registration.precision import ARMS

    if args.steps < 2:
        raise ValueError(f"--steps: need at least 2, got {args.steps}")
    stages = _split(args.stages, option="--stages",
                    known=("precision", "data", "registration", "learning"))
    if ({"registration", "learning"} & set(stages)) and "data" not in stages:
        raise ValueError("--stages: registration and learning need the data stage")
    registration_arms = _split(args.registration_arms, option="--registration-arms", known=ARMS)
    learning_arms = _split(args.learning_arms, option="--learning-arms", known=STRATEGIES)
    if not 1 <= args.registered_subjects <= args.subjects:
        raise ValueError(f"--registered-subjects: must be between 1 and --subjects ({args.subjects})")
    out: Path = args.out
    prepare_output(out)
    write_json_atomic(out / MARKER, {"command": "dynomp demo", "stages": list(stages),
                                     "seed": args.seed})
    rows: list[dict] = []
    if "precision" in stages:
        summary = run_precision_stage(out, steps=args.steps, seed=args.seed)
        for arm, result in summary.items():
            rows.append({"stage": "precision (digits MLP)", "subject": "held-out", "arm": arm,
                         "status": "completed", "dice_mean": float("nan"),
                         "jacobian_nonpositive_percent": float("nan"), "seconds": float("nan"),
                         "formats": ", ".join(f"{k} {v}" for k, v in
                                              result["steps_per_format"].items()),
                         "test_accuracy": result["test_accuracy"]})
    if "data" in stages:
        paths = run_data_stage(out, subjects=args.subjects, resolution=args.resolution,
                               seed=args.seed)
        if "registration" in stages:
            subjects = [f"{index:02d}" for index in range(1, args.registered_subjects + 1)]
            rows += run_registration_stage(out, paths=paths, subjects=subjects,
                                           arms=registration_arms)
        if "learning" in stages:
            rows += run_learning_stage(out, data=paths["data"], arms=learning_arms,
                                       steps=args.learning_steps, seed=args.seed)
    table = pd.DataFrame(rows)
    with atomic_path(out / "summary.tsv") as temporary:
        table.to_csv(temporary, sep="\t", index=False)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, na_rep="-", float_format=lambda value: f"{value:.3f}"))
    print(f"results: {out.resolve()}")
    print(f"summary: {(out / 'summary.tsv').resolve()}")
    return 0
