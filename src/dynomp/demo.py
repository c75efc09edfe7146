"""`dynomp demo`: the main job on the embedded default, end to end, in a few minutes on 2 cores.

Runs every stage that the package provides today, in order, and writes into one output folder:

1. ``precision``: the DynoMP controller on a real training loop (a small MLP on scikit-learn's
   bundled digits, offline), fixed fp32 against ``dynomp`` in virtual execution, so that the
   formats it picks are the formats it computes in. Writes ``precision/trace.parquet`` (one row per
   step and arm) and ``precision/summary.json``.
"""

from __future__ import annotations

import argparse
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `dynomp demo`."""
    parser = subparsers.add_parser("demo", help="run the main job on the embedded default")
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=300, help="training steps per arm")
    parser.add_argument("--seed", type=int, default=0, help="master seed")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run every stage and print where the results are."""
    if args.steps < 2:
        raise ValueError(f"--steps: need at least 2, got {args.steps}")
    out: Path = args.out
    summary = run_precision_stage(out, steps=args.steps, seed=args.seed)
    print("precision stage (digits MLP, virtual execution):")
    for arm, result in summary.items():
        formats = ", ".join(f"{k}: {v}" for k, v in result["steps_per_format"].items())
        print(
            f"  {arm:<7} test accuracy {result['test_accuracy']:.3f}  "
            f"final loss {result['final_loss']:.4f}  steps per format: {formats}"
        )
    print(f"results: {out.resolve()}")
    return 0
