"""`dynomp cohort`, `dynomp template` and `dynomp fetch`: the data a study starts from."""

from __future__ import annotations

import argparse
from pathlib import Path

from dynomp.data.templates import TEMPLATE_NAME, TEMPLATE_RESOLUTIONS


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
        help=f"{TEMPLATE_NAME} (default: built from nilearn's copy at res-01, res-02 and "
        "--resolution) "
        "or a TemplateFlow name to get through templateflow (e.g. MNI152NLin2009cAsym)",
    )
    template.add_argument(
        "--resolution", type=int, default=1, help="resolution index to get (default 1)"
    )
    template.add_argument(
        "--brain", type=Path, metavar="PATH",
        help="also write the template's brain here (its desc-brain T1w, or T1w x brain mask)",
    )
    template.add_argument(
        "--labels", type=Path, metavar="PATH",
        help=f"also write the template's label map (dseg) here ({TEMPLATE_NAME} only)",
    )
    template.set_defaults(handler=template_command)

    fetch = subparsers.add_parser(
        "fetch",
        help="datalad clone a dataset and get only its T1w images (or OASIS subject folders), "
        "or make a DataLad dataset of an archive",
    )
    fetch.add_argument(
        "--source",
        required=True,
        help="dataset URL or local path (the paper's: ///corr/RawDataBIDS/BMB_1), or a .tar, "
        ".tar.gz, .tgz or .zip archive as a URL, file:// URL or local path (neurite-OASIS: "
        "https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar)",
    )
    fetch.add_argument("--dest", required=True, type=Path, help="where to clone (must not exist)")
    fetch.add_argument(
        "--layout",
        choices=("auto", "bids", "oasis"),
        default="auto",
        help="bids: sub-*/anat T1w images; oasis: OASIS_OAS1_*_MR1/ folders, at least 2 "
        "(default auto: oasis where such folders are, else bids)",
    )
    fetch.add_argument(
        "--subjects",
        nargs="+",
        default=None,
        help="BIDS subject labels (default: all; an archive is fetched whole)",
    )
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

    if args.labels is not None and args.template != TEMPLATE_NAME:
        raise ValueError(f"--labels: {args.template} has no label map here; only {TEMPLATE_NAME}")
    if args.template == TEMPLATE_NAME:
        build_template_home(
            args.home, resolutions=tuple(sorted({*TEMPLATE_RESOLUTIONS, args.resolution}))
        )
        files = template_files(
            args.home, template=TEMPLATE_NAME, resolution=args.resolution, t1w_desc="brain"
        )
    else:
        args.home.mkdir(parents=True, exist_ok=True)
        files = template_files(
            args.home, template=args.template, resolution=args.resolution, t1w_desc=None
        )
    if args.labels is not None:
        files["dseg"] = export_template_labels(args.home, resolution=args.resolution, out=args.labels)
    if args.brain is not None:
        files["brain"] = export_template_brain(files, out=args.brain)
    for kind, path in files.items():
        print(f"{kind}\t{path}")
    return 0


def export_template_brain(files: dict[str, Path], *, out: Path) -> Path:
    """Write the brain of a template: its T1w if already skull-stripped, else T1w x brain mask."""
    import numpy as np

    from dynomp.data.nifti import read_volume, write_volume

    t1w = read_volume(files["T1w"])
    if "desc-brain" in files["T1w"].name:
        return write_volume(out, t1w.data, t1w.affine, dtype="float32")
    mask = read_volume(files["mask"], labels=True)
    if mask.data.shape != t1w.data.shape:
        raise ValueError(f"{files['mask']}: shape {mask.data.shape} differs from {files['T1w']}")
    return write_volume(out, np.where(mask.data > 0, t1w.data, 0.0), t1w.affine, dtype="float32")


def export_template_labels(home: Path, *, resolution: int, out: Path) -> Path:
    """Copy the template's label map at `resolution` to `out`, atomically."""
    import shutil

    from dynomp.atomic import atomic_path
    from dynomp.data.templates import get_template

    source = get_template(home, template=TEMPLATE_NAME, resolution=resolution, suffix="dseg",
                          extension=".nii.gz")
    with atomic_path(out) as temporary:
        shutil.copyfile(source, temporary)
    return out


def fetch_command(args: argparse.Namespace) -> int:
    """Clone and get, or extract an archive; print each file or subject folder fetched."""
    from dynomp.data.sources import fetch

    fetched = fetch(
        args.source,
        dest=args.dest,
        subjects=args.subjects,
        extra_paths=args.also,
        layout=args.layout,
    )
    for path in fetched:
        print(path)
    return 0
