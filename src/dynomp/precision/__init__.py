"""The precision core: formats, exact emulation, the p_min estimator, the policy and the controller.

Pure and small on purpose: the part of dynomp others cite and reuse in their own training loops.
"""

from dynomp.precision.controller import (
    DEFAULT_FORMATS,
    EXECUTION_MODES,
    TRACE_COLUMNS,
    PrecisionController,
)
from dynomp.precision.dispatch import VirtualPrecision
from dynomp.precision.estimator import estimate_lipschitz, estimate_pmin
from dynomp.precision.formats import (
    FORMATS,
    FloatFormat,
    container_dtype,
    get_format,
    native_formats,
    nearest_native,
)
from dynomp.precision.policy import choose_format
from dynomp.precision.rounding import ROUNDING_MODES, is_representable, round_to

__all__ = [
    "DEFAULT_FORMATS",
    "EXECUTION_MODES",
    "FORMATS",
    "ROUNDING_MODES",
    "TRACE_COLUMNS",
    "FloatFormat",
    "PrecisionController",
    "VirtualPrecision",
    "choose_format",
    "container_dtype",
    "estimate_lipschitz",
    "estimate_pmin",
    "get_format",
    "is_representable",
    "native_formats",
    "nearest_native",
    "round_to",
]
