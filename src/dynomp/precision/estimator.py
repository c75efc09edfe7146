"""The minimum significand precision a gradient step needs (after Hayford et al. 2024, Theorem 1).

At step t with parameters theta_t and gradient g_t the local Lipschitz constant of the gradient is
estimated by the secant

    K = ||g_t - g_{t-1}|| / ||theta_t - theta_{t-1}||

and the step needs at least

    p_min = log2((4 + 3 sqrt(2)) * K * ||theta_t|| / ||g_t||)

significand bits. Norms are global L2 norms over all tensors, accumulated in float64 so that an
fp16 state cannot overflow them.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numba import njit

from dynomp import native
from dynomp.threads import run_split

PMIN_CONSTANT = 4.0 + 3.0 * math.sqrt(2.0)
# A step shorter than this, relative to ||theta||, carries no usable secant information.
RELATIVE_STEP_TOLERANCE = 1e-12
# p_min is clipped at 0: below that any format qualifies and the log would run to -inf.
PMIN_FLOOR = 0.0

TensorOrTensors = torch.Tensor | Sequence[torch.Tensor]


def as_tensor_list(value: TensorOrTensors, argument: str) -> list[torch.Tensor]:
    """A tensor or a sequence of floating tensors, as a list; ValueError names the argument."""
    tensors = [value] if isinstance(value, torch.Tensor) else list(value)
    if not tensors:
        raise ValueError(f"{argument}: no tensors given")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{argument}[{index}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{argument}[{index}]: expected a floating tensor, got {tensor.dtype}")
    return tensors


def check_same_shapes(
    first: list[torch.Tensor], second: list[torch.Tensor], first_name: str, second_name: str
) -> None:
    """Raise a ValueError naming `second_name` when its tensors do not match `first`'s shapes."""
    if len(first) != len(second):
        raise ValueError(
            f"{second_name}: {len(second)} tensors where {first_name} has {len(first)}"
        )
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.shape != b.shape:
            raise ValueError(
                f"{second_name}[{index}]: shape {tuple(b.shape)} differs from "
                f"{first_name}[{index}] shape {tuple(a.shape)}"
            )


def _squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over all tensors, as a float64 tensor on their device (no host sync)."""
    return torch.stack(
        [torch.linalg.vector_norm(t.detach(), dtype=torch.float64) ** 2 for t in tensors]
    ).sum()


def _squared_difference_norm(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """||a - b||^2 over all tensors, each difference taken in the wider of the two dtypes."""
    squares = []
    for x, y in zip(a, b, strict=True):
        x, y = x.detach(), y.detach()
        common = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        difference = x.to(common) - y.to(common)
        squares.append(torch.linalg.vector_norm(difference, dtype=torch.float64) ** 2)
    return torch.stack(squares).sum()


def _max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest magnitude over all tensors, as a float64 tensor on their device."""
    maxima = [t.detach().abs().max().double() for t in tensors if t.numel()]
    return torch.stack(maxima).max() if maxima else torch.zeros((), dtype=torch.float64)


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm over all tensors, accumulated in float64."""
    return math.sqrt(float(_squared_norm(tensors)))


def difference_norm(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """||a - b|| over all tensors, each difference taken in the wider of the two dtypes."""
    return math.sqrt(float(_squared_difference_norm(a, b)))


def max_abs(tensors: Sequence[torch.Tensor]) -> float:
    """The largest magnitude over all tensors (0.0 for all-zero or empty state)."""
    return float(_max_abs(tensors))


def step_statistics(
    theta: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    prev_theta: Sequence[torch.Tensor] | None,
    prev_grad: Sequence[torch.Tensor] | None,
    *,
    with_max_abs: bool = False,
    keep: bool = False,
) -> dict[str, float]:
    """Norms one step needs, fetched from the device in one transfer.

    Keys: param_norm, grad_norm, step_norm and grad_change_norm (NaN without a previous step),
    max_abs (NaN unless asked for), kept (see below). CPU float32/float64 states take one compiled
    pass per tensor (`_compiled_statistics`); others (CUDA, 8- and 16-bit dtypes) torch reductions
    in float64.

    keep: overwrite prev_theta and prev_grad with theta and grad in the same pass, where the
    compiled pass runs and each previous tensor is a contiguous tensor of its current one's dtype
    and shape (the caller's own copies; kept is then 1.0, else 0.0 and nothing is written). A
    caller that keeps the previous step this way reads and writes its copies once per step, with no
    new allocation (a fresh copy of SyN's state, 30 MB in float64, cost more than the statistics).
    """
    previous = [*prev_theta, *prev_grad] if prev_theta is not None and prev_grad is not None else None
    if _compiled_applies([*theta, *grad, *(previous or [])]):
        writable = keep and previous is not None and all(
            p.dtype == t.dtype and p.shape == t.shape and p.is_contiguous()
            for t, p in zip([*theta, *grad], previous, strict=True))
        return _compiled_statistics(theta, grad, previous, with_max_abs=with_max_abs, keep=writable)
    nan = torch.full((), math.nan, dtype=torch.float64, device=theta[0].device)
    values = [_squared_norm(theta), _squared_norm(grad)]
    if prev_theta is not None and prev_grad is not None:
        values += [_squared_difference_norm(theta, prev_theta),
                   _squared_difference_norm(grad, prev_grad)]
    else:
        values += [nan, nan]
    values.append(torch.maximum(_max_abs(theta), _max_abs(grad)).to(nan.device)
                  if with_max_abs else nan)
    squares = torch.stack([v.to(nan.device) for v in values]).tolist()
    return {
        "param_norm": math.sqrt(squares[0]),
        "grad_norm": math.sqrt(squares[1]),
        "step_norm": math.sqrt(squares[2]),
        "grad_change_norm": math.sqrt(squares[3]),
        "max_abs": squares[4],
        "kept": 0.0,
    }


_COMPILED_DTYPES = (torch.float32, torch.float64)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sums(a, b, keep, start, stop):  # pragma: no cover - compiled
    """sum a^2, sum (a - b)^2 and max |a| over start..stop, accumulated in float64; with `keep`,
    b[n] = a[n] as each pair is read (b holds the previous step, then this one)."""
    squares = 0.0
    differences = 0.0
    largest = 0.0
    for n in range(start, stop):
        value = a[n]
        x = np.float64(value)
        d = x - np.float64(b[n])
        if keep:
            b[n] = value
        squares += x * x
        differences += d * d
        largest = max(largest, abs(x))
    return squares, differences, largest


def load_kernels() -> None:
    """Load (or compile) the statistics kernels for every pair of float32/float64 tensors now: a
    state and its previous step differ in dtype for one step after a format change."""
    native_statistics()
    for first in (np.float32, np.float64):
        for second in (np.float32, np.float64):
            _sums(np.zeros(1, dtype=first), np.zeros(1, dtype=second), False, 0, 1)


def _compiled_applies(tensors: Sequence[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _COMPILED_DTYPES for t in tensors)


_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}
_native_statistics: dict[tuple[torch.dtype, torch.dtype], Any] | None = None


def native_statistics() -> dict[tuple[torch.dtype, torch.dtype], Any]:
    """The C statistics kernels (`statistics.c`) by (dtype of a, dtype of b), compiled for this
    machine on first use; empty where no C compiler is available or `DYNOMP_NATIVE=0` (the numba
    kernel `_sums` runs then)."""
    global _native_statistics
    if _native_statistics is None:
        library = native.library("precision/statistics", fallback="the numba statistics kernel")
        _native_statistics = {}
        if library is not None:
            for first, first_suffix in _SUFFIXES.items():
                for second, second_suffix in _SUFFIXES.items():
                    kernel = getattr(library, f"statistics_{first_suffix}_{second_suffix}")
                    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
                    kernel.restype = None
                    _native_statistics[first, second] = kernel
    return _native_statistics


def _compiled_sums(a: torch.Tensor, b: torch.Tensor | None, *, keep: bool = False) -> tuple[float, float, float]:
    """(||a||^2, ||a - b||^2, max |a|) in one pass, split over torch's threads; b None: a - a.

    keep: b (contiguous, a's dtype and shape) is overwritten with a in the same pass."""
    keep = keep and b is not None
    if a.numel() < _PYTHON_SUMS_BELOW:
        return _python_sums(a, b, keep=keep)
    flat = a.detach().contiguous().reshape(-1)
    # to be written, b is taken as it is (the caller checked that it is contiguous); else a copy may do
    other = flat if b is None else b.detach().reshape(-1) if keep else b.detach().contiguous().reshape(-1)
    kernel = native_statistics().get((flat.dtype, other.dtype))
    if kernel is not None:
        # one row per thread the call may use (torch's OpenMP threads), zeros where one did not run
        slots = max(1, torch.get_num_threads())
        out = np.zeros((slots, 3), dtype=np.float64)
        kernel(flat.data_ptr(), other.data_ptr(), 0, flat.numel(), int(keep), out.ctypes.data, slots)
        parts = out.tolist()
    else:
        parts = run_split(_sums, flat.numpy(), other.numpy(), keep, points=flat.numel())
    squares = math.fsum(part[0] for part in parts)
    # a NaN anywhere makes the sums NaN; the maximum, compared without NaN, says so too
    largest = math.nan if math.isnan(squares) else max(part[2] for part in parts)
    return squares, math.fsum(part[1] for part in parts), largest


# below this many elements (statistics.c's STATISTICS_LANES) the C kernel adds every element into one
# lane, in order: Python floats (doubles) do the same additions, without the call's set-up, which
# was most of a rigid or affine iteration's observation
_PYTHON_SUMS_BELOW = 16


def _python_sums(a: torch.Tensor, b: torch.Tensor | None, *, keep: bool) -> tuple[float, float, float]:
    """`_compiled_sums` of a few elements (none included), in Python floats: the same values bit
    for bit. With `keep`, b (a's shape) becomes a."""
    values = a.detach().reshape(-1).tolist()
    previous = values if b is None else b.detach().reshape(-1).tolist()
    squares = differences = largest = 0.0
    for value, before in zip(values, previous, strict=True):
        difference = value - before
        squares += value * value
        differences += difference * difference
        largest = max(largest, abs(value))  # a NaN is passed over, as C's comparison passes it
    if keep:
        b.copy_(a.detach())
    largest = math.nan if math.isnan(squares) else largest
    return squares, differences, largest


def _compiled_statistics(theta: Sequence[torch.Tensor], grad: Sequence[torch.Tensor],
                         previous: list[torch.Tensor] | None, *, with_max_abs: bool,
                         keep: bool = False) -> dict[str, float]:
    """`step_statistics` from one compiled pass over each tensor and its previous value.

    Accumulating in float64 needs no overflow or underflow check, and reading each tensor once
    (norm, difference norm and maximum together, no difference tensor) took the controller's
    observation of SyN's full-resolution state from 23 to 14 ms in float64 and from 20 to 13 ms in
    float32, against torch reductions in each tensor's own dtype (benchmarks/registration_parts.py;
    the rest is the copies the controller keeps).
    """
    tensors = [*theta, *grad]
    sums = [_compiled_sums(t, None if previous is None else p, keep=keep)
            for t, p in zip(tensors, previous or [None] * len(tensors), strict=True)]
    count = len(theta)
    return {
        "param_norm": math.sqrt(math.fsum(s[0] for s in sums[:count])),
        "grad_norm": math.sqrt(math.fsum(s[0] for s in sums[count:])),
        "step_norm": math.sqrt(math.fsum(s[1] for s in sums[:count])) if previous is not None else math.nan,
        "grad_change_norm": (math.sqrt(math.fsum(s[1] for s in sums[count:]))
                             if previous is not None else math.nan),
        "max_abs": _nan_max([s[2] for s in sums]) if with_max_abs else math.nan,
        "kept": 1.0 if keep else 0.0,
    }


def _nan_max(values: Sequence[float]) -> float:
    """The largest value, or NaN if any is NaN (Python's max keeps whichever NaN comparison allows)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def secant_lipschitz(step_norm: float, grad_change_norm: float, param_norm: float) -> float | None:
    """K = ||g - g_prev|| / ||theta - theta_prev||; None when the step is too short to tell."""
    scale = max(param_norm, 1.0)
    if not math.isfinite(step_norm) or step_norm <= RELATIVE_STEP_TOLERANCE * scale:
        return None
    lipschitz = grad_change_norm / step_norm
    return lipschitz if math.isfinite(lipschitz) else None


def estimate_lipschitz(
    theta: TensorOrTensors,
    grad: TensorOrTensors,
    prev_theta: TensorOrTensors,
    prev_grad: TensorOrTensors,
) -> float | None:
    """Secant estimate of the gradient's Lipschitz constant; None when the step is too short."""
    theta_list = as_tensor_list(theta, "theta")
    grad_list = as_tensor_list(grad, "grad")
    prev_theta_list = as_tensor_list(prev_theta, "prev_theta")
    prev_grad_list = as_tensor_list(prev_grad, "prev_grad")
    check_same_shapes(theta_list, grad_list, "theta", "grad")
    check_same_shapes(theta_list, prev_theta_list, "theta", "prev_theta")
    check_same_shapes(theta_list, prev_grad_list, "theta", "prev_grad")
    return _secant(theta_list, grad_list, prev_theta_list, prev_grad_list)


def _secant(theta, grad, prev_theta, prev_grad) -> float | None:
    stats = step_statistics(theta, grad, prev_theta, prev_grad)
    return secant_lipschitz(stats["step_norm"], stats["grad_change_norm"], stats["param_norm"])


def pmin_from_norms(lipschitz: float, param_norm: float, grad_norm: float) -> float | None:
    """p_min = log2((4 + 3 sqrt 2) K ||theta|| / ||g||), clipped at 0; None for a zero gradient."""
    if not (grad_norm > 0.0 and math.isfinite(grad_norm)):
        return None
    argument = PMIN_CONSTANT * lipschitz * param_norm / grad_norm
    if not math.isfinite(argument):
        return None
    if argument <= 2.0**PMIN_FLOOR:
        return PMIN_FLOOR
    return math.log2(argument)


def estimate_pmin(
    theta: TensorOrTensors,
    grad: TensorOrTensors,
    prev_theta: TensorOrTensors,
    prev_grad: TensorOrTensors,
    *,
    previous_lipschitz: float | None = None,
    previous_pmin: float = PMIN_FLOOR,
) -> float:
    """The minimum significand precision (bits, implicit bit included) this step needs.

    Guards, from the method: a step too short for the secant keeps `previous_lipschitz` (and, with
    none, returns `previous_pmin`); a zero gradient means converged and returns `previous_pmin`, so
    a caller that passes its current estimate stays where it is. Never returns inf or NaN.
    """
    theta_list = as_tensor_list(theta, "theta")
    grad_list = as_tensor_list(grad, "grad")
    prev_theta_list = as_tensor_list(prev_theta, "prev_theta")
    prev_grad_list = as_tensor_list(prev_grad, "prev_grad")
    check_same_shapes(theta_list, grad_list, "theta", "grad")
    check_same_shapes(theta_list, prev_theta_list, "theta", "prev_theta")
    check_same_shapes(theta_list, prev_grad_list, "theta", "prev_grad")
    stats = step_statistics(theta_list, grad_list, prev_theta_list, prev_grad_list)
    lipschitz = secant_lipschitz(stats["step_norm"], stats["grad_change_norm"], stats["param_norm"])
    if lipschitz is None:
        lipschitz = previous_lipschitz
    if lipschitz is None:
        return previous_pmin
    pmin = pmin_from_norms(lipschitz, stats["param_norm"], stats["grad_norm"])
    return previous_pmin if pmin is None else pmin
