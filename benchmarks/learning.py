"""Benchmark of the learning arms; prints Markdown tables for docs/benchmarks.md.

    .venv/bin/python benchmarks/learning.py [--dims 2 3] [--steps 5] [--device cpu] [--large]

1. Steps/s of every strategy training VoxelMorph (the paper's setting: batch 4, nb_features
   [16]*5, MSE + 0.01 * grad) on 2D 160 x 192 and 3D 64^3 synthetic pairs (and 160 x 192 x 224
   with --large, meant for a GPU). All strategies run round-robin, one step each in turn, in one
   process, so other load on the machine hits them alike; the median after a warm-up is reported.
2. Peak memory of each strategy in its own process (peak RSS on CPU, so the process's baseline
   sampled during the steps, minus the resident set before them as "training memory"; torch's
   peak allocation on CUDA).
3. The dynomp controller's overhead per step against fp32 (target on CPU: <= 10%). On CPU every
   format dynomp can choose runs as fp32 (the only native float32-or-narrower format there), so
   the two arms do the same arithmetic and their difference is the controller's cost, which is
   also timed on its own (observe + any cast).
4. Which strategies diverge, and at which step, over `--divergence-steps` steps in 2D.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dynomp.evaluate.meters import current_rss_bytes
from dynomp.learning.config import load_config
from dynomp.learning.strategies import STRATEGIES
from dynomp.learning.train import build_run, train, training_step

SHAPES = {2: (160, 192, 3), 3: (64, 64, 64)}
LARGE_SHAPE = (160, 192, 224)


def write_cohort(root: Path, shape: tuple[int, int, int], count: int = 6, seed: int = 0) -> Path:
    """Synthetic subjects in the BIDS-derivatives layout: nested ellipsoids, shifted, noisy."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    for index in range(count):
        centre, radii = rng.uniform(-0.15, 0.15, 3), rng.uniform(0.55, 0.75, 3)
        distance = np.sqrt(
            sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
        )
        labels = (distance < 1.0).astype(np.int16) + (distance < 0.5)
        image = np.choose(labels, [10.0, 60.0, 100.0]) + rng.normal(0, 2.0, size=shape)
        folder = root / "derivatives" / "synth" / f"sub-{index + 1:02d}" / "anat"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = folder / f"sub-{index + 1:02d}_space-MNI"
        nib.save(
            nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
            f"{prefix}_desc-preproc_T1w.nii.gz",
        )
        nib.save(nib.Nifti1Image(labels, np.eye(4)), f"{prefix}_dseg.nii.gz")
    return root


def measure_memory(*, arm: str, dim: int, data: Path, steps: int, device: str) -> dict:
    """Peak memory of one strategy over a few steps, in a fresh process so the peak is its own.

    On CPU the resident set is sampled every millisecond during the steps: the process's lifetime
    peak (getrusage) is often set by imports, before training starts.
    """
    config = load_config(arm=arm, dim=dim, steps=steps, device=device)
    run = build_run(config, data)
    baseline = 0 if device == "cuda" else current_rss_bytes()
    samples = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(current_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        sampler.start()
    for step in range(1, steps + 1):
        training_step(run, step)
    done.set()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        sampler.join()
        peak = max(samples)
    return {"arm": arm, "peak_memory_bytes": int(peak), "baseline_bytes": int(baseline)}


def measure_speed(*, arms: list[str], dim: int, data: Path, steps: int, device: str) -> dict:
    """Median step seconds of every strategy, run round-robin step by step in one process.

    Alternating the arms makes other load on the machine hit all of them alike. The dynomp arm's
    `after_step` (observe + any cast) is timed on its own as the controller's cost.
    """
    runs = {
        arm: build_run(load_config(arm=arm, dim=dim, steps=steps + 1, device=device), data)
        for arm in arms
    }
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    controller: list[float] = []
    if "dynomp" in runs:
        strategy = runs["dynomp"].strategy
        original_after_step = strategy.after_step

        def timed_after_step(model, optimizer):
            start = time.perf_counter()
            original_after_step(model, optimizer)
            controller.append(time.perf_counter() - start)

        strategy.after_step = timed_after_step
    for step in range(1, steps + 2):  # step 1 is a warm-up
        for arm, run in runs.items():
            start = time.perf_counter()
            training_step(run, step)
            if device == "cuda":
                torch.cuda.synchronize()
            times[arm].append(time.perf_counter() - start)
    result = {arm: statistics.median(values[1:]) for arm, values in times.items()}
    if controller:
        result["controller"] = statistics.median(controller[1:])
        result["formats"] = sorted(
            {row["format"] for row in runs["dynomp"].strategy.controller.trace}
        )
    return result


def divergence(*, data: Path, steps: int, out: Path) -> list[dict]:
    """Train every strategy in 2D for `steps` steps and report how each ended."""
    rows = []
    for arm in STRATEGIES:
        config = load_config(arm=arm, dim=2, steps=steps, checkpoint_every=steps)
        result = train(config, data=data, out=out / arm, progress=False)
        metrics = json.loads((out / arm / "metrics.json").read_text())
        rows.append(
            {"arm": arm, "status": result.status, "final_loss": metrics["final_loss_total"]}
        )
    return rows


def main() -> None:
    """Run the benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per strategy and grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--large", action="store_true", help="also 160 x 192 x 224 (GPU)")
    parser.add_argument("--arms", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--divergence-steps", type=int, default=60)
    parser.add_argument("--memory-arm", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_arm:
        row = measure_memory(
            arm=args.memory_arm, dim=args.dim, data=Path(args.data), steps=2, device=args.device
        )
        print(json.dumps(row))
        return
    grids = {str(dim): (dim, SHAPES[dim]) for dim in args.dims}
    if args.large:
        grids["3-large"] = (3, LARGE_SHAPE)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        print(
            f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, batch 4, "
            f"nb_features [16]*5, {args.steps} timed steps after 1 warm-up\n"
        )
        speed_rows, overhead_rows = [], []
        for key, (dim, shape) in grids.items():
            data = write_cohort(root / f"cohort-{key}", shape)
            grid = "x".join(str(n) for n in (shape[:2] if dim == 2 else shape))
            speeds = measure_speed(
                arms=args.arms, dim=dim, data=data, steps=args.steps, device=args.device
            )
            for arm in args.arms:
                command = [
                    sys.executable,
                    __file__,
                    "--memory-arm",
                    arm,
                    "--dim",
                    str(dim),
                    "--data",
                    str(data),
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                ]
                completed = subprocess.run(command, capture_output=True, text=True, check=True)
                memory = json.loads(completed.stdout.strip().splitlines()[-1])
                speed_rows.append((grid, arm, speeds[arm], memory))
            if "dynomp" in speeds and "fp32" in speeds:
                overhead_rows.append((grid, speeds))
        reference = {
            grid: (seconds, memory) for grid, arm, seconds, memory in speed_rows if arm == "fp32"
        }
        print(
            "| grid | strategy | step s (median) | steps/s | speed vs fp32 | peak memory (MB) "
            "| training memory (MB) | training memory vs fp32 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for grid, arm, seconds, memory in speed_rows:
            training = memory["peak_memory_bytes"] - memory["baseline_bytes"]
            fp32_seconds, fp32_memory = reference.get(grid, (float("nan"), None))
            fp32_training = (
                fp32_memory["peak_memory_bytes"] - fp32_memory["baseline_bytes"]
                if fp32_memory
                else float("nan")
            )
            print(
                f"| {grid} | {arm} | {seconds:.3f} | {1 / seconds:.2f} "
                f"| {fp32_seconds / seconds:.2f} "
                f"| {memory['peak_memory_bytes'] / 2**20:.0f} | {training / 2**20:.0f} "
                f"| {training / fp32_training:.2f} |"
            )
        print(
            "\n| grid | fp32 step s | dynomp step s | dynomp vs fp32 | controller per step "
            "| controller / fp32 step | formats chosen |"
        )
        print("|---|---|---|---|---|---|---|")
        for grid, speeds in overhead_rows:
            fp32, dynomp, controller = speeds["fp32"], speeds["dynomp"], speeds["controller"]
            print(
                f"| {grid} | {fp32:.3f} | {dynomp:.3f} | {100 * (dynomp - fp32) / fp32:+.1f}% "
                f"| {controller * 1000:.1f} ms | {100 * controller / fp32:.1f}% "
                f"| {', '.join(speeds['formats'])} |"
            )
        if args.divergence_steps and 2 in args.dims:
            data = root / "cohort-2"
            print(f"\n| strategy | after {args.divergence_steps} steps (2D 160x192) | final loss |")
            print("|---|---|---|")
            for row in divergence(data=data, steps=args.divergence_steps, out=root / "runs"):
                print(f"| {row['arm']} | {row['status']} | {row['final_loss']:.4g} |")


if __name__ == "__main__":
    main()
