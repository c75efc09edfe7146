"""An independent, slow, exact reference for rounding to a format: Python Fractions, one value at a time."""

from __future__ import annotations

import math
from fractions import Fraction

from dynomp.precision.formats import FloatFormat


def reference_round(value: float, fmt: FloatFormat) -> float:
    """Round a Python float to `fmt` exactly (round half to even, subnormals, overflow)."""
    if math.isnan(value) or value == 0.0:
        return value
    sign = -1.0 if value < 0 else 1.0
    magnitude = abs(value)
    if math.isinf(magnitude):
        return sign * (fmt.max_finite if fmt.saturates else math.inf)
    exponent = math.frexp(magnitude)[1] - 1  # magnitude in [2^exponent, 2^(exponent+1))
    exponent = max(exponent, fmt.min_exponent)
    quantum = Fraction(2) ** (exponent - (fmt.precision - 1))
    quanta = round(Fraction(magnitude) / quantum)  # Fraction rounding is half-to-even
    rounded = quanta * quantum
    if rounded > Fraction(fmt.max_finite):
        return sign * (fmt.max_finite if fmt.saturates else math.inf)
    return sign * float(rounded)
