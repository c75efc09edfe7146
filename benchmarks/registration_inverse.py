"""Inverse consistency of the engine's output warps: SyN's fields inverted plainly, damped, by Newton.

    .venv/bin/python benchmarks/registration_inverse.py [--arm fp64] [--threads 2] [--seed 0]

Registers the registration benchmark's pair (benchmarks/registration.py: the 3 mm template under
two random diffeomorphisms and a rigid misalignment, the paper's schedule) three times in one
process with the same arm, once with each inversion of SyN's fields (the fixed-point iteration
plain, `INVERSION_DAMPING` 1.0, and damped, 0.5; and Newton's, the default), each up to 30 steps
with the engine's tolerance, and reports for each the output warps' inverse
consistency: for every fixed voxel x with forward displacement f(x) (mm), the moving point
p = x + f(x), and the residual |p + i(p) - x| in voxels, with i the inverse displacement sampled at
p, over the whole grid (its edges included, where border padding clamps) and over the labelled
(brain) voxels. Also mean Dice and the inversion's share of the wall time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from registration import VOXEL_MM, benchmark_config, build_pair, load_volume, mean_dice, write_pair


def residual_voxels(result, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """|x + f(x) + i(x + f(x)) - x| per fixed voxel, in voxels (the pair's grids are the same)."""
    from dynomp.registration.transforms import sample

    forward = np.moveaxis(result.forward_displacement, -1, 0)  # (3, *shape), mm
    inverse = torch.as_tensor(np.moveaxis(result.inverse_displacement, -1, 0))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    linear, offset = affine[:3, :3], affine[:3, 3]
    points = np.einsum("ij,j...->i...", linear, grid) + offset[:, None, None, None]
    moved = points + forward
    voxels = np.einsum("ij,j...->i...", np.linalg.inv(linear), moved - offset[:, None, None, None])
    back = sample(inverse, torch.as_tensor(voxels), padding="border").numpy()
    return np.linalg.norm(moved + back - points, axis=0) / VOXEL_MM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="fp64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from dynomp.registration import pipeline
    from dynomp.registration.interpolation import load_kernels

    torch.set_num_threads(args.threads)
    load_kernels()
    config = benchmark_config("paper", args.threads)
    with tempfile.TemporaryDirectory(prefix="dynomp-bench-pair-") as work:
        folder = Path(work)
        pair = build_pair(seed=args.seed)
        write_pair(pair, folder)
        fixed, moving = load_volume(folder, "fixed"), load_volume(folder, "moving")
        moving_labels = load_volume(folder, "moving_labels")
    rows = []
    damping_default = pipeline.INVERSION_DAMPING
    for label, method, damping in (("damped 1 (plain)", "damped", 1.0), ("damped 0.5", "damped", damping_default),
                                   ("newton", "newton", damping_default)):
        pipeline.INVERSION_METHOD, pipeline.INVERSION_DAMPING = method, damping
        inversions = []
        invert = pipeline.invert

        def timed(*arguments, _invert=invert, _seconds=inversions, **keywords):
            started = time.perf_counter()
            value = _invert(*arguments, **keywords)
            _seconds.append(time.perf_counter() - started)
            return value

        pipeline.invert = timed
        started = time.perf_counter()
        try:
            result = pipeline.register_pair(fixed=fixed, moving=moving, config=config, precision=args.arm)
        finally:
            pipeline.invert = invert
        seconds = time.perf_counter() - started
        residual = residual_voxels(result, pair["fixed"].shape, pair["affine"])
        dice, _ = mean_dice(pair["fixed_labels"], result.warp_moving(moving_labels.data, labels=True))
        for region, inside in (("whole grid", np.ones(residual.shape, dtype=bool)),
                               ("labelled voxels", pair["fixed_labels"] > 0)):
            values = residual[inside]
            quantiles = np.percentile(values, [50, 99, 99.9, 100])
            rows.append(f"| {label} | {region} | {quantiles[0]:.2e} | {quantiles[1]:.2e} | "
                        f"{quantiles[2]:.2e} | {quantiles[3]:.2e} | {100 * (values > 0.01).mean():.2f} | "
                        f"{dice:.4f} | {sum(inversions):.2f} of {seconds:.1f} |")
        print(f"{label}: done", flush=True)
    print(f"\narm {args.arm}, pair {pair['fixed'].shape} voxels of {VOXEL_MM:g} mm, {args.threads} threads\n")
    print("| inversion | voxels | residual median (voxels) | 99th percentile | 99.9th | largest | "
          "% > 0.01 | mean Dice | inversion s of wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
