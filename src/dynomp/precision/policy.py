"""From an estimated p_min to a format: the cheapest allowed format that is precise enough."""

from __future__ import annotations

import math
from collections.abc import Iterable

from dynomp.precision.formats import cost_key, get_format

FALLBACK_FORMAT = "fp64"


def choose_format(pmin: float, formats: Iterable[str], max_abs: float | None = None) -> str:
    """The cheapest format in `formats` with p >= pmin whose range holds `max_abs`; else fp64.

    Cheapest means fewest storage bits, then the smaller p (bf16 before fp16 at 16 bits).
    """
    if isinstance(formats, str):
        raise ValueError(f"formats: expected a collection of format names, got the string {formats!r}")
    candidates = [get_format(name, argument="formats") for name in formats]
    if not candidates:
        raise ValueError("formats: at least one format is needed")
    if isinstance(pmin, bool) or not isinstance(pmin, int | float) or math.isnan(pmin):
        raise ValueError(f"pmin: expected a number, got {pmin!r}")
    if max_abs is not None and (math.isnan(max_abs) or max_abs < 0):
        raise ValueError(f"max_abs: expected a non-negative number, got {max_abs!r}")
    for fmt in sorted(set(candidates), key=cost_key):
        if fmt.precision < pmin:
            continue
        if max_abs is not None and max_abs > fmt.max_finite:
            continue
        return fmt.name
    return FALLBACK_FORMAT
