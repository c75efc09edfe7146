"""The `dynomp` command. Every workflow rule calls one of its subcommands; logic lives in the library.

Each subpackage that offers commands has a `commands` module with `register(subparsers)`, which adds
its subcommands and sets `handler` on each; this module only assembles them and turns the library's
ValueError/FileNotFoundError into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dynomp import __version__

COMMAND_MODULES = (
    "dynomp.precision.commands",
    "dynomp.registration.commands",
    "dynomp.demo",
    "dynomp.learning.commands",
    "dynomp.data.commands",
    "dynomp.preprocess.commands",
    "dynomp.report.commands",
    "dynomp.sweep",
    "dynomp.workflow",
)


class UsageError(Exception):
    """A problem with the user's input, printed as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="dynomp",
        description="Dynamic mixed precision for medical image registration.",
    )
    parser.add_argument("--version", action="version", version=f"dynomp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"dynomp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
