"""Floating-point formats, each given by its significand precision p and exponent bits e.

p counts the implicit bit, as in the paper: fp32 has p = 24, bf16 p = 8. A format is *native* on a
device when torch computes in it there, and *virtual* otherwise (emulated by rounding, see
`dynomp.precision.rounding`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: p significand bits (implicit bit included), e exponent bits.

    `saturates` marks the OCP "FN" formats without infinities (fp8-e4m3): overflow clamps to the
    largest finite value there, as torch's own float8_e4m3fn cast does.
    """

    name: str
    precision: int
    exponent_bits: int
    dtype: torch.dtype | None = None
    saturates: bool = False
    max_finite: float = field(init=False)
    min_normal: float = field(init=False)
    min_subnormal: float = field(init=False)

    def __post_init__(self) -> None:
        bias = 2 ** (self.exponent_bits - 1) - 1
        if self.saturates:
            # FN layout: the all-ones exponent still holds normals, all-ones significand is NaN.
            max_exponent = bias + 1
            max_significand = 2.0 - 2.0 ** (2 - self.precision)
        else:
            max_exponent = bias
            max_significand = 2.0 - 2.0 ** (1 - self.precision)
        object.__setattr__(self, "max_finite", max_significand * 2.0**max_exponent)
        object.__setattr__(self, "min_normal", 2.0 ** (1 - bias))
        object.__setattr__(self, "min_subnormal", 2.0 ** (1 - bias - (self.precision - 1)))

    @property
    def bits(self) -> int:
        """Storage width: sign + exponent + stored significand bits."""
        return 1 + self.exponent_bits + self.precision - 1

    @property
    def bias(self) -> int:
        """Exponent bias, 2^(e-1) - 1."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (emin)."""
        return 1 - self.bias

    def holds(self, other: FloatFormat) -> bool:
        """True when every value of `other` is exactly representable in this format."""
        return (
            self.precision >= other.precision
            and self.max_finite >= other.max_finite
            and self.min_subnormal <= other.min_subnormal
        )


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp64", 53, 11, torch.float64),
        FloatFormat("fp32", 24, 8, torch.float32),
        FloatFormat("fp24", 16, 8),
        FloatFormat("tf32", 11, 8),
        FloatFormat("fp16", 11, 5, torch.float16),
        FloatFormat("bf16", 8, 8, torch.bfloat16),
        FloatFormat("fp8-e4m3", 4, 4, torch.float8_e4m3fn, saturates=True),
        FloatFormat("fp8-e5m2", 3, 5, torch.float8_e5m2),
    )
}

# Formats torch computes in, by device type. bf16/fp16 kernels exist on CPU too, but most are
# slower than fp32 there, so CPU execution rounds them up to fp32 (override with native_formats=).
NATIVE_FORMATS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp64", "fp32"),
    "cuda": ("fp64", "fp32", "fp16", "bf16"),
    "mps": ("fp32", "fp16", "bf16"),
}


def get_format(name: str | FloatFormat, *, argument: str = "fmt") -> FloatFormat:
    """Look a format up by name; a ValueError names the argument and the known names."""
    if isinstance(name, FloatFormat):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        known = ", ".join(FORMATS)
        raise ValueError(f"{argument}: unknown format {name!r} (known: {known})") from None


def validate_formats(names: Iterable[str], *, argument: str = "formats") -> tuple[str, ...]:
    """Check a set of format names; return them as a tuple, cheapest first."""
    names = tuple(names)
    if not names:
        raise ValueError(f"{argument}: at least one format is needed")
    formats = [get_format(n, argument=argument) for n in names]
    return tuple(f.name for f in sorted(set(formats), key=cost_key))


# formats torch has arithmetic for, which a `native_formats` setting may name (fp8 tensors only
# store values: no operation computes in them)
COMPUTING_FORMATS = ("fp64", "fp32", "fp16", "bf16")


def validate_native_formats(names: Iterable[str], *, argument: str = "native_formats") -> tuple[str, ...]:
    """Check a `native_formats` setting: a list of known formats torch computes in; return them as
    `validate_formats` does. A ValueError names `argument` and the problem."""
    if isinstance(names, str):
        raise ValueError(f"{argument}: expected a list of format names, got {names!r}")
    native = validate_formats(names, argument=argument)
    for name in native:
        if name not in COMPUTING_FORMATS:
            raise ValueError(f"{argument}: torch does not compute in {name!r} "
                             f"(it can run natively: {', '.join(COMPUTING_FORMATS)})")
    return native


def cost_key(fmt: FloatFormat) -> tuple[int, int]:
    """Sort key for 'cheapest': fewest storage bits first, then the smaller precision."""
    return (fmt.bits, fmt.precision)


def native_formats(device: str | torch.device) -> tuple[str, ...]:
    """Names of the formats torch computes in on this device type."""
    device_type = torch.device(device).type
    return NATIVE_FORMATS.get(device_type, ("fp64", "fp32"))


def nearest_native(
    name: str, native: Iterable[str], *, argument: str = "fmt"
) -> str:
    """The cheapest native format that holds every value of `name` (a native name maps to itself)."""
    fmt = get_format(name, argument=argument)
    candidates = [get_format(n, argument="native_formats") for n in native]
    holding = [c for c in candidates if c.holds(fmt)]
    if not holding:
        return "fp64"
    return min(holding, key=cost_key).name


def container_dtype(name: str, native: Iterable[str] = ("fp64", "fp32")) -> torch.dtype:
    """The torch dtype that stores a format: its own dtype when native, else fp32 or fp64."""
    fmt = get_format(name)
    native = tuple(native)
    if fmt.name in native and fmt.dtype is not None:
        return fmt.dtype
    return torch.float32 if FORMATS["fp32"].holds(fmt) else torch.float64
