"""From an estimated p_min to a format: the cheapest allowed format that is precise enough."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

from dynomp.precision.formats import FloatFormat, get_format, validate_formats

FALLBACK_FORMAT = "fp64"


@functools.lru_cache(maxsize=64)
def _by_cost(names: tuple[str, ...]) -> tuple[FloatFormat, ...]:
    """The formats named, each once, cheapest first (a controller asks at every step)."""
    return tuple(get_format(name) for name in validate_formats(names, argument="formats"))


def choose_format(pmin: float, formats: Iterable[str], max_abs: float | None = None) -> str:
    """The cheapest format in `formats` with p >= pmin whose range holds `max_abs`; else fp64.

    Cheapest means fewest storage bits, then the smaller p (bf16 before fp16 at 16 bits).
    """
    if isinstance(formats, str):
        raise ValueError(f"formats: expected a collection of format names, got the string {formats!r}")
    names = tuple(formats)
    try:
        candidates = _by_cost(names)
    except TypeError:  # an unhashable entry: get_format names it
        candidates = _by_cost.__wrapped__(names)
    if isinstance(pmin, bool) or not isinstance(pmin, int | float) or math.isnan(pmin):
        raise ValueError(f"pmin: expected a number, got {pmin!r}")
    if max_abs is not None and (math.isnan(max_abs) or max_abs < 0):
        raise ValueError(f"max_abs: expected a non-negative number, got {max_abs!r}")
    for fmt in candidates:
        if fmt.precision < pmin:
            continue
        if max_abs is not None and max_abs > fmt.max_finite:
            continue
        return fmt.name
    return FALLBACK_FORMAT
