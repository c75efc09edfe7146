"""Training steps with glibc's default heap against steps inside `dynomp.heap.reused_heap`.

    .venv/bin/python benchmarks/heap.py [--arm fp32] [--dim 2] [--steps 10] [--rounds 2] [--threads 2]

`dynomp train` runs its steps inside `reused_heap` (as `register_pair` runs a registration). This
measures what that saves: each round runs the arm twice, once with the default heap and once inside
the context, the order alternating by round, each in a fresh child process (so that one's heap does
not carry into the other's). A child builds a run of the arm on the benchmark cohort of
`benchmarks/learning.py` (2-D: 160 x 192 slices; 3-D: 64^3), resets the kernel's peak resident
counter, takes one warm-up step and then `--steps` timed steps. It reports the median step time,
page faults and system time per timed step (getrusage), and the peak resident memory above the
resident size before the warm-up step (VmHWM). The engine's side of the same change is measured by
`benchmarks/registration.py --against`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import SHAPES, write_cohort
from registration import peak_resident_bytes, reset_peak_resident, resident_bytes

from dynomp.heap import reused_heap
from dynomp.learning.config import load_config
from dynomp.learning.strategies import STRATEGIES
from dynomp.learning.train import build_run, training_step

MODES = ("default heap", "reused_heap")


def timed_steps(*, arm: str, dim: int, data: Path, steps: int, mode: str) -> dict[str, float]:
    """Median step seconds, page faults and system seconds per step of `steps` steps after a
    warm-up, and the peak resident bytes above the resident size before the warm-up."""
    run = build_run(load_config(arm=arm, dim=dim, steps=steps + 1, device="cpu"), data)
    context = reused_heap() if mode == "reused_heap" else contextlib.nullcontext()
    baseline = resident_bytes()
    reset_peak_resident()
    with context:
        training_step(run, 1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = []
        for step in range(2, steps + 2):
            started = time.perf_counter()
            training_step(run, step)
            seconds.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        peak = peak_resident_bytes() - baseline
    return {"seconds": statistics.median(seconds), "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "system": (after.ru_stime - before.ru_stime) / steps, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="fp32", help=f"a training strategy (known: {', '.join(STRATEGIES)})")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_mode:
        torch.set_num_threads(args.threads)
        print(json.dumps(timed_steps(arm=args.arm, dim=args.dim, data=args.data, steps=args.steps,
                                     mode=args.run_mode)))
        return
    if args.arm not in STRATEGIES:
        parser.error(f"--arm: unknown strategy {args.arm!r} (known: {', '.join(STRATEGIES)})")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds: must be at least 1")
    torch.set_num_threads(args.threads)
    found: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="dynomp-heap-") as work:
        data = write_cohort(Path(work) / "cohort", SHAPES[args.dim])
        for round_ in range(args.rounds):
            for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                child = subprocess.run(
                    [sys.executable, __file__, "--run-mode", mode, "--data", str(data), "--arm", args.arm,
                     "--dim", str(args.dim), "--steps", str(args.steps), "--threads", str(args.threads)],
                    capture_output=True, text=True, check=False,
                )
                if child.returncode != 0:
                    tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
                    raise SystemExit(f"{mode}: the child failed (exit {child.returncode}): {tail}")
                found[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"{args.arm}, {args.dim}-D, {args.threads} threads, {args.rounds} rounds of {args.steps} steps\n")
    print("| heap | median step s (rounds) | page faults per step | system s per step | peak MB above the start (rounds) |")
    print("|---|---|---:|---:|---|")
    medians = {}
    for mode in MODES:
        rows = found[mode]
        medians[mode] = statistics.median(row["seconds"] for row in rows)
        rounds = ", ".join(f"{row['seconds']:.4f}" for row in rows)
        peaks = ", ".join(f"{row['peak'] / 2**20:.1f}" for row in rows)
        print(f"| {mode} | {medians[mode]:.4f} ({rounds}) | {statistics.median(row['faults'] for row in rows):.0f} | "
              f"{statistics.median(row['system'] for row in rows):.4f} | {peaks} |")
    print(f"\nreused_heap / default heap, step time: {medians['reused_heap'] / medians['default heap']:.3f}")


if __name__ == "__main__":
    main()
