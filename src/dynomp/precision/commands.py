"""`dynomp formats`: the table of formats and where each is native."""

from __future__ import annotations

import argparse

from dynomp.precision.formats import FORMATS, native_formats


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the precision subcommands."""
    parser = subparsers.add_parser("formats", help="list the floating-point formats")
    parser.add_argument("--device", default="cpu", help="device whose native formats to mark")
    parser.set_defaults(handler=list_formats)


def list_formats(args: argparse.Namespace) -> int:
    """Print one line per format: name, p, e, bits, largest finite, smallest subnormal, native."""
    native = native_formats(args.device)
    print(f"{'format':<10}{'p':>4}{'e':>4}{'bits':>6}{'max finite':>14}{'min subnormal':>15}  native")
    for fmt in FORMATS.values():
        print(
            f"{fmt.name:<10}{fmt.precision:>4}{fmt.exponent_bits:>4}{fmt.bits:>6}"
            f"{fmt.max_finite:>14.6g}{fmt.min_subnormal:>15.6g}  {'yes' if fmt.name in native else 'no'}"
        )
    return 0
