"""`dynomp tables`, `dynomp stats` and `dynomp figures`: a study's results as tables, statistics
and figures."""

from __future__ import annotations

import argparse
from pathlib import Path


def _list_file_line(line: str) -> list[str]:
    """One argument per non-blank line of an @listfile, surrounding spaces dropped."""
    stripped = line.strip()
    return [stripped] if stripped else []


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the report subcommands."""
    tables = subparsers.add_parser(
        "tables",
        help="tidy tables (Parquet + TSV) of registration, training and sweep runs",
        description="Arguments may be read from files: @FILE holds one argument per line "
        "(e.g. `--registration @registration_runs.txt`).",
        fromfile_prefix_chars="@",
    )
    # argparse's default keeps blank lines as empty arguments; a list of runs may end with one
    tables.convert_arg_line_to_args = _list_file_line
    tables.add_argument("--out", required=True, type=Path, help="directory for the tables")
    tables.add_argument("--registration", nargs="*", action="extend", default=[], type=Path,
                        metavar="RUN", help="`dynomp register` output directories "
                        "(results/<study>/registration/sub-<S>/<ARM>)")
    tables.add_argument("--learning", nargs="*", action="extend", default=[], type=Path,
                        metavar="RUN", help="`dynomp train` output directories")
    tables.add_argument("--sweep", type=Path, metavar="DIR",
                        help="`dynomp sweep` output directory (holds sweep_metrics.parquet)")
    tables.set_defaults(handler=tables_command)

    stats = subparsers.add_parser(
        "stats", help="relative final-loss differences with tests, arm comparison, learning summary"
    )
    stats.add_argument("--tables", required=True, type=Path, help="`dynomp tables` output")
    stats.add_argument("--out", required=True, type=Path, help="directory for the statistics")
    stats.add_argument("--baseline", default="fp64",
                       help="reference registration arm (default fp64)")
    stats.add_argument("--arm", action="append", dest="arms", metavar="ARM",
                       help="compare only this arm's final losses with the baseline (repeatable; "
                       "default: every other arm)")
    stats.add_argument("--alpha", type=float, default=0.05,
                       help="family-wise error rate of the tests and intervals (default 0.05)")
    stats.set_defaults(handler=stats_command)

    figures = subparsers.add_parser("figures", help="p_min traces, loss curves, metrics by arm "
                                    "(PNG + SVG)")
    figures.add_argument("--tables", required=True, type=Path, help="`dynomp tables` output")
    figures.add_argument("--out", required=True, type=Path, help="directory for the figures")
    figures.set_defaults(handler=figures_command)


def tables_command(args: argparse.Namespace) -> int:
    """Write the tables and print how many rows each has."""
    from dynomp.report.tables import write_tables

    tables = write_tables(out=args.out, registration_runs=args.registration,
                          learning_runs=args.learning, sweep=args.sweep)
    for name, frame in tables.items():
        print(f"{name}\t{len(frame)}")
    return 0


def stats_command(args: argparse.Namespace) -> int:
    """Write the statistics tables and print how many rows each has."""
    from dynomp.report.stats import write_stats

    results = write_stats(tables=args.tables, out=args.out, baseline=args.baseline,
                          arms=args.arms, alpha=args.alpha)
    for name, frame in results.items():
        print(f"{name}\t{len(frame)}")
    return 0


def figures_command(args: argparse.Namespace) -> int:
    """Write the figures and print their paths."""
    from dynomp.report.figures import write_figures

    for path in write_figures(tables=args.tables, out=args.out):
        print(path)
    return 0
