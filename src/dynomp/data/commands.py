"""`dynomp cohort`, `dynomp template` and `dynomp fetch`: the data a study starts from."""

from __future__ import annotations

import argparse
from pathlib import Path

from dynomp.data.templates import TEMPLATE_NAME


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data subcommands."""
    cohort = subparsers.add_parser(
        "cohort", help="build the embedded synthetic cohort (BIDS, DataLad dataset)"
    )
    cohort.add_argument(
        "--out", required=True, type=Path, help="dataset directory to create (must not exist)"
    )
    cohort.add_argument("--subjects", type=int, default=8, help="number of subjects (default 8)")
    cohort.add_argument(
        "--resolution", type=float, default=2.0, help="voxel size in mm (default 2)"
    )
    cohort.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    cohort.add_argument(
        "--no-datalad", action="store_true", help="plain folder, not a DataLad dataset"
    )
    cohort.set_defaults(handler=cohort_command)

    template = subparsers.add_parser(
        "template",
        help=f"fill a TemplateFlow home: {TEMPLATE_NAME} built offline, or any template fetched",
    )
    template.add_argument("--home", required=True, type=Path, help="TemplateFlow home directory")
    template.add_argument(
        "--template",
        default=TEMPLATE_NAME,
        help=f"{TEMPLATE_NAME} (default: built from nilearn's copy, res-01 and res-02) "
        "or a TemplateFlow name to get through templateflow (e.g. MNI152NLin2009cAsym)",
    )
    template.add_argument(
        "--resolution", type=int, default=1, help="resolution index to get (default 1)"
    )
    template.set_defaults(handler=template_command)

    fetch = subparsers.add_parser(
        "fetch", help="datalad clone a BIDS dataset and get only its T1w images"
    )
    fetch.add_argument(
        "--source",
        required=True,
        help="dataset URL or local path (the paper's: ///corr/RawDataBIDS/BMB_1)",
    )
    fetch.add_argument("--dest", required=True, type=Path, help="where to clone (must not exist)")
    fetch.add_argument("--subjects", nargs="+", default=None, help="subject labels (default: all)")
    fetch.add_argument(
        "--also",
        nargs="+",
        default=(),
        metavar="PATH",
        help="further paths in the dataset to get (e.g. derivatives/truth)",
    )
    fetch.set_defaults(handler=fetch_command)


def cohort_command(args: argparse.Namespace) -> int:
    """Build the cohort and print its directory."""
    from dynomp.data.cohort import build_cohort

    out = build_cohort(
        args.out,
        subjects=args.subjects,
        resolution=args.resolution,
        seed=args.seed,
        datalad=not args.no_datalad,
    )
    print(out.resolve())
    return 0


def template_command(args: argparse.Namespace) -> int:
    """Build or get the template; print the files that templateflow resolves."""
    from dynomp.data.templates import build_template_home, template_files

    if args.template == TEMPLATE_NAME:
        build_template_home(args.home)
        files = template_files(
            args.home, template=TEMPLATE_NAME, resolution=args.resolution, t1w_desc="brain"
        )
    else:
        args.home.mkdir(parents=True, exist_ok=True)
        files = template_files(
            args.home, template=args.template, resolution=args.resolution, t1w_desc=None
        )
    for kind, path in files.items():
        print(f"{kind}\t{path}")
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    """Clone and get; print each file fetched."""
    from dynomp.data.sources import fetch

    for path in fetch(args.source, dest=args.dest, subjects=args.subjects, extra_paths=args.also):
        print(path)
    return 0
