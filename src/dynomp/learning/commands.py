"""`dynomp train` and `dynomp evaluate-model`: one learning arm, and its held-out evaluation."""

from __future__ import annotations

import argparse

import torch

from dynomp.learning.config import TASKS, load_config
from dynomp.learning.strategies import STRATEGIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the learning subcommands."""
    parser = subparsers.add_parser("train", help="train one learning arm (VoxelMorph or the CNN)")
    parser.add_argument("--arm", required=True, help=f"precision arm: {', '.join(STRATEGIES)}")
    parser.add_argument("--task", choices=TASKS, default=None, help="default: registration")
    parser.add_argument(
        "--data", default=None, help="dataset directory (BIDS derivatives, OASIS, MNIST)"
    )
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--config", default=None, help="YAML file of settings")
    parser.add_argument("--device", default=None, help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: all)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=train_command)

    evaluate = subparsers.add_parser(
        "evaluate-model",
        help="Dice, Jacobian and time/memory of a trained VoxelMorph on held-out pairs",
    )
    evaluate.add_argument("--run", required=True, help="run directory written by `dynomp train`")
    evaluate.add_argument("--data", required=True, help="dataset directory the run was trained on")
    evaluate.add_argument("--out", required=True, help="table to write (.parquet or .tsv)")
    evaluate.set_defaults(handler=evaluate_command)


def train_command(args: argparse.Namespace) -> int:
    """Train the arm; print its status; exit 0 when completed or diverged, 143 when interrupted."""
    from dynomp.learning.train import train

    config = load_config(
        args.config,
        arm=args.arm,
        task=args.task,
        dim=args.dim,
        steps=args.steps,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
    )
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {args.threads}")
    # process-wide torch settings, restored afterwards for callers that run several commands
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if torch.device(config.device).type == "cpu":
            # same seed + same command => same weights, also across a kill and a resume
            torch.use_deterministic_algorithms(True, warn_only=True)
        result = train(config, data=args.data, out=args.out, progress=not args.quiet)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    print(f"{config.task} {config.arm}: {result.status}")
    return result.exit_code


def evaluate_command(args: argparse.Namespace) -> int:
    """Evaluate a trained run on its held-out pairs and write the tidy table."""
    from dynomp.learning.evaluate import evaluate_model

    table = evaluate_model(run=args.run, data=args.data, out=args.out)
    print(f"wrote {args.out}: {len(table)} rows")
    return 0
