"""`dynomp register`: register one pair with one arm and write images, warps, trace and metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from dynomp.registration.precision import ARMS, check_arm
from dynomp.registration.run import register_files


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `register` subcommand."""
    parser = subparsers.add_parser("register", help="register a moving image to a fixed image")
    parser.add_argument("--fixed", required=True, type=Path, help="fixed image (NIfTI)")
    parser.add_argument("--moving", required=True, type=Path, help="moving image (NIfTI)")
    parser.add_argument("--arm", required=True, help=f"one of: {', '.join(ARMS)}")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--fixed-labels", type=Path, help="label map on the fixed image's grid")
    parser.add_argument("--moving-labels", type=Path, help="label map on the moving image's grid")
    parser.add_argument(
        "--config", type=Path,
        help="YAML config, or a preset: paper (the default, the paper's parameters) or quick",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.set_defaults(handler=run_register)


def run_register(args: argparse.Namespace) -> int:
    """Register, then write warped image and labels, both warps, trace.parquet and metrics.json."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device: cuda was asked for but no CUDA device is available")
    register_files(
        fixed=args.fixed,
        moving=args.moving,
        arm=check_arm(args.arm),
        out=args.out,
        fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels,
        config=args.config,
        device=args.device,
        threads=args.threads,
    )
    return 0
