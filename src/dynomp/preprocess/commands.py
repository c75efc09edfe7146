"""`dynomp brain-extract` (one image) and `dynomp brain-extract-dataset` (every subject of a BIDS dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dynomp.preprocess.brain_extraction import (
    DEFAULT_FRACTIONAL_THRESHOLD,
    DEFAULT_ITERATIONS,
    DEFAULT_METHOD,
    METHODS,
    extract_brain_dataset,
    extract_brain_file,
)


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"one of: {', '.join(METHODS)} (default {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--fractional-threshold",
        type=float,
        default=DEFAULT_FRACTIONAL_THRESHOLD,
        help=f"BET's fractional intensity threshold in (0, 1); smaller gives larger brains (default {DEFAULT_FRACTIONAL_THRESHOLD})",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"surface iterations (default {DEFAULT_ITERATIONS})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `brain-extract` and `brain-extract-dataset` subcommands."""
    single = subparsers.add_parser(
        "brain-extract", help="extract the brain from one whole-head T1w image"
    )
    single.add_argument(
        "t1", type=Path, nargs="?", metavar="T1", help="whole-head T1-weighted image (NIfTI)"
    )
    single.add_argument(
        "--bids", type=Path, metavar="DIR",
        help="instead of T1: a BIDS dataset, with --subject (its first T1w image is used)",
    )
    single.add_argument("--subject", metavar="LABEL", help="subject label in --bids")
    single.add_argument("--mask", required=True, type=Path, help="output brain mask (NIfTI, uint8)")
    single.add_argument(
        "--brain", required=True, type=Path, help="output skull-stripped image (NIfTI)"
    )
    _add_method_options(single)
    single.set_defaults(handler=run_brain_extract)

    dataset = subparsers.add_parser(
        "brain-extract-dataset",
        help="extract the brain of every subject of a BIDS dataset into DIR/derivatives/dynomp",
    )
    dataset.add_argument(
        "--bids",
        "--dataset",
        dest="bids",
        required=True,
        type=Path,
        metavar="DIR",
        help="BIDS dataset root",
    )
    dataset.add_argument(
        "--subjects", nargs="+", metavar="LABEL", help="subject labels (default: all)"
    )
    _add_method_options(dataset)
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    dataset.set_defaults(handler=run_brain_extract_dataset)


def run_brain_extract(args: argparse.Namespace) -> int:
    """Extract one brain and print the mask's volume and the time taken."""
    result = extract_brain_file(
        _t1_image(args),
        mask=args.mask,
        brain=args.brain,
        method=args.method,
        fractional_threshold=args.fractional_threshold,
        iterations=args.iterations,
    )
    print(f"{args.mask}: brain {result.volume_ml:.1f} ml ({result.method}, {result.seconds:.1f} s)")
    return 0


def _t1_image(args: argparse.Namespace) -> Path:
    """The T1 positional argument, or the first T1w image of --subject in --bids."""
    from dynomp.data.sources import t1w_files

    if (args.t1 is None) == (args.bids is None):
        raise ValueError("brain-extract: give either T1 or --bids with --subject")
    if args.t1 is not None:
        return args.t1
    if not args.subject:
        raise ValueError("--subject: required with --bids")
    return args.bids / t1w_files(args.bids, subjects=[args.subject])[0]


def run_brain_extract_dataset(args: argparse.Namespace) -> int:
    """Extract every requested subject's brain and print one line per image."""
    records = extract_brain_dataset(
        args.bids,
        subjects=args.subjects,
        method=args.method,
        fractional_threshold=args.fractional_threshold,
        iterations=args.iterations,
        progress=not args.quiet,
    )
    for record in records:
        print(
            f"sub-{record['subject']}: {record['mask']} ({record['volume_ml']:.1f} ml, {record['seconds']:.1f} s)"
        )
    return 0
