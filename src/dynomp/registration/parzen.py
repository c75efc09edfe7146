"""Mattes mutual information on the CPU, compiled: the Parzen joint histogram and the gradient.

`dynomp.registration.metrics.mutual_information` written as torch operations builds each sample's
4 x 4 Parzen window products, scatters them into the joint histogram, and autograd walks back
through the same N x 16 tensors: about 60 operations per iteration. That was most of a rigid or
affine iteration at the full-resolution level, and at the coarse levels the operations' dispatch
was the whole iteration.

Here the same quantity is two loops over the samples (numba), in the samples' own dtype:

- forward: both images' cubic B-spline taps per sample, the 16 products added into the joint
  histogram, then MI from the normalised histogram and its marginals;
- backward: with G_ij = log(p_ij / (p_i p_j)) (0 on empty bins) and S the histogram's total,

      dMI/dm_n = (1 / S) sum_a sum_b wf_a(n) G[i_a, j_b] dwm_b(n)/dm_n.

  The normalisation's own derivative drops out: each sample's weights sum to 1 whatever its value,
  so S does not depend on the moving intensities, and the +1 of d(p log p)/dp multiplies
  sum_ij dp_ij = 0.

It gives the torch expression's value and gradient to rounding (tests/registration, both dtypes)
and runs where that would run on CPU tensors, except under an emulated format
(`VirtualPrecision`), which rounds the result of every torch operation and so needs the operations.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from dynomp.registration.interpolation import NUMPY_DTYPES, native_kernels
from dynomp.threads import run_split


@njit(cache=True, nogil=True, boundscheck=False)
def _taps(value, low, scale, padding, top):  # pragma: no cover - compiled
    """A value's first bin (of four), its fraction past the second, and whether it was in range."""
    position = (value - low) * scale + padding
    inside = padding <= position <= top
    position = min(max(position, padding), top)
    floor = np.floor(position)
    return int(floor) - 1, position - floor, inside


@njit(cache=True, nogil=True, boundscheck=False)
def _weights(f, one, three, four, sixth):  # pragma: no cover - compiled
    """The cubic B-spline's four weights at fraction f (constants in f's dtype)."""
    g = one - f
    f2 = f * f
    f3 = f2 * f
    return (g * g * g * sixth, (three * f3 - (three + three) * f2 + four) * sixth,
            (three * f2 - three * f3 + three * f + one) * sixth, f3 * sixth)


@njit(cache=True, nogil=True, boundscheck=False)
def _slopes(f, one, two, three, four, half):  # pragma: no cover - compiled
    """The four weights' derivatives with respect to f."""
    g = one - f
    f2 = f * f
    return -g * g * half, (three * f2 - four * f) * half, (two * f + one - three * f2) * half, f2 * half


@njit(cache=True, nogil=True, boundscheck=False)
def _histogram(fixed, moving, ranges, joint):  # pragma: no cover - compiled
    """Add the samples' Parzen products into `joint` (bins x bins, zeroed); False on a NaN.

    ranges: fixed low, fixed scale, moving low, moving scale, padding, top (in the samples' dtype).
    """
    real = fixed.dtype.type
    one, three, four, sixth = real(1), real(3), real(4), real(1) / real(6)
    padding, top = ranges[4], ranges[5]
    for n in range(fixed.shape[0]):
        if not (fixed[n] == fixed[n] and moving[n] == moving[n]):
            return False
        i, f, _ = _taps(fixed[n], ranges[0], ranges[1], padding, top)
        j, m, _ = _taps(moving[n], ranges[2], ranges[3], padding, top)
        m0, m1, m2, m3 = _weights(m, one, three, four, sixth)
        f0, f1, f2, f3 = _weights(f, one, three, four, sixth)
        for a, weight in ((0, f0), (1, f1), (2, f2), (3, f3)):
            joint[i + a, j] += weight * m0
            joint[i + a, j + 1] += weight * m1
            joint[i + a, j + 2] += weight * m2
            joint[i + a, j + 3] += weight * m3
    return True


@njit(cache=True, nogil=True, boundscheck=False)
def _information(joint, log_ratio):  # pragma: no cover - compiled
    """MI of the joint histogram (normalised here), with G into `log_ratio`; returns (MI, total)."""
    zero = joint.dtype.type(0)
    bins = joint.shape[0]
    total = joint.sum()
    rows = joint.sum(axis=1) / total
    columns = joint.sum(axis=0) / total
    information = zero
    for i in range(bins):
        for j in range(bins):
            p = joint[i, j] / total
            if p > zero:
                ratio = np.log(p / (rows[i] * columns[j]))
                log_ratio[i, j] = ratio
                information += p * ratio
            else:
                log_ratio[i, j] = zero
    return information, total


@njit(cache=True, nogil=True, boundscheck=False)
def _gradient(fixed, moving, ranges, log_ratio, total, out, start, stop):  # pragma: no cover - compiled
    """dMI/d(moving value) of the samples start..stop into `out`."""
    real = fixed.dtype.type
    zero, one, two, three, four = real(0), real(1), real(2), real(3), real(4)
    half, sixth = one / two, one / real(6)
    padding, top = ranges[4], ranges[5]
    factor = ranges[3] / total
    for n in range(start, stop):
        i, f, _ = _taps(fixed[n], ranges[0], ranges[1], padding, top)
        j, m, inside = _taps(moving[n], ranges[2], ranges[3], padding, top)
        if not inside:  # a clamped intensity does not move its bins
            out[n] = zero
            continue
        f0, f1, f2, f3 = _weights(f, one, three, four, sixth)
        d0, d1, d2, d3 = _slopes(m, one, two, three, four, half)
        value = zero
        for a, weight in ((0, f0), (1, f1), (2, f2), (3, f3)):
            value += weight * (log_ratio[i + a, j] * d0 + log_ratio[i + a, j + 1] * d1
                               + log_ratio[i + a, j + 2] * d2 + log_ratio[i + a, j + 3] * d3)
        out[n] = value * factor


class _MattesInformation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, ranges: np.ndarray, bins: int) -> torch.Tensor:
        fixed = fixed.detach().contiguous()
        moving = moving.detach().contiguous()
        joint = np.zeros((bins, bins), dtype=ranges.dtype)
        log_ratio = np.zeros_like(joint)
        total = ranges.dtype.type(1)
        if _histogram(fixed.numpy(), moving.numpy(), ranges, joint):
            information, total = _information(joint, log_ratio)
        else:  # a NaN intensity (a diverging run): NaN, as the torch expression gives
            information = np.nan
        ctx.save_for_backward(fixed, moving)
        ctx.ranges, ctx.log_ratio, ctx.total = ranges, log_ratio, total
        return torch.tensor(information, dtype=moving.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        fixed, moving = ctx.saved_tensors
        gradient = torch.empty_like(moving)
        run_split(_gradient, fixed.numpy(), moving.numpy(), ctx.ranges, ctx.log_ratio, ctx.total,
                  gradient.numpy(), points=moving.shape[0])
        return None, gradient * grad.to(moving.dtype), None, None


def _ranges(*, bins: int, padding: int, fixed_range: tuple[float, float], moving_range: tuple[float, float],
            dtype: torch.dtype) -> np.ndarray:
    """The kernels' Parzen mapping: fixed low and scale, moving low and scale, padding, top position."""
    usable = bins - 1 - 2 * padding
    values = []
    for low, high in (fixed_range, moving_range):
        span = high - low if high > low else 1.0
        values += [low, usable / span]
    return np.asarray([*values, padding, bins - 1 - padding], dtype=NUMPY_DTYPES[dtype])


def compiled_information(fixed: torch.Tensor, moving: torch.Tensor, *, bins: int, padding: int,
                         fixed_range: tuple[float, float], moving_range: tuple[float, float]) -> torch.Tensor:
    """Mattes MI (nats) of two equally long 1-D CPU vectors of one float dtype, differentiable in
    `moving`; the Parzen mapping of `metrics.parzen_taps` (`padding` bins kept free at each end)."""
    ranges = _ranges(bins=bins, padding=padding, fixed_range=fixed_range, moving_range=moving_range,
                     dtype=moving.dtype)
    return _MattesInformation.apply(fixed, moving, ranges, bins)


class LinearInformation:
    """Mattes MI of fixed samples against a moving volume under a linear map, in one compiled call.

    A rigid or affine level maps its fixed sample points p (fixed-grid voxels, 3 x N) to C p on the
    moving grid, C = M^-1 T F (3 x 4); this computes the samples' moving values there, the Parzen
    joint histogram, MI and dMI/dC in two passes over the samples (`sampler.c`, `linear_mattes`),
    where the same quantity as torch operations (`transforms.map_points`, `transforms.sample`,
    `compiled_information`) was a dozen operations and autograd's walk back through them. The
    gradient is computed with the value (`value_and_gradient`); the caller carries it on to the
    parameters through the small matrix products that make C.

    CPU float32/float64 3-D volumes with a C compiler (`applies`); the caller keeps the torch
    operations elsewhere, and under an emulated format. Holds a 4 x N scratch buffer.

    Given the map's geometry (`geometry`: the rotation centre c, M^-1 and F), `loss_and_gradient`
    goes from a rigid or affine parameter vector to -MI and its gradient in one call
    (`sampler.c`, `linear_parameters`): the map C, the kernel and the chain rule back to the
    parameters, all in the volume's dtype.
    """

    def __init__(self, *, moving: torch.Tensor, points: torch.Tensor, fixed: torch.Tensor, bins: int,
                 padding: int, fixed_range: tuple[float, float], moving_range: tuple[float, float],
                 geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        self.moving = moving.detach().contiguous()
        self.points = points.detach().reshape(3, -1).contiguous()
        self.fixed = fixed.detach().reshape(-1).contiguous()
        self.bins = bins
        self.ranges = _ranges(bins=bins, padding=padding, fixed_range=fixed_range, moving_range=moving_range,
                              dtype=moving.dtype)
        self.kernel = native_kernels().get(("linear_mattes", moving.dtype))
        self.scratch = torch.empty(4, self.fixed.numel(), dtype=moving.dtype)
        self.geometry = None
        if geometry is not None:
            center, moving_inverse, fixed_affine = geometry
            self.geometry = torch.cat([center.detach().reshape(3).cpu(), moving_inverse.detach().reshape(16).cpu(),
                                       fixed_affine.detach().reshape(16).cpu()]).to(moving.dtype).contiguous()
            self.parameter_kernel = native_kernels()[("linear_parameters", moving.dtype)]

    @staticmethod
    def applies(moving: torch.Tensor, points: torch.Tensor, fixed: torch.Tensor, *, bins: int) -> bool:
        """Whether the compiled kernel can run on these tensors (no emulated format is checked here)."""
        return (
            moving.dim() == 3 and points.shape[0] == 3 and bins <= _KERNEL_BINS
            and all(t.device.type == "cpu" and t.dtype == moving.dtype for t in (moving, points, fixed))
            and moving.dtype in (torch.float32, torch.float64) and moving.numel() < 2**31
            and ("linear_mattes", moving.dtype) in native_kernels()
        )

    def value_and_gradient(self, combined: np.ndarray) -> tuple[float, np.ndarray]:
        """MI at the 3 x 4 map `combined` (a NumPy array, cast to the volume's dtype) and dMI/dC."""
        matrix = np.ascontiguousarray(combined[:3], dtype=self.ranges.dtype)
        gradient = np.empty_like(matrix)
        information = self.kernel(
            self.moving.data_ptr(), *self.moving.shape, self.points.data_ptr(), self.fixed.data_ptr(),
            self.fixed.numel(), matrix.ctypes.data, self.ranges.ctypes.data, self.bins,
            self.scratch.data_ptr(), gradient.ctypes.data,
        )
        return information, gradient

    def loss_and_gradient(self, parameters: torch.Tensor, kind: str) -> tuple[float, torch.Tensor]:
        """-MI and its gradient with respect to a rigid (three angles, R = Rz Ry Rx) or affine (3 x 3
        matrix, row-major) parameter vector followed by the translation, of the transform
        y = R (x - c) + c + t; a CPU tensor of the volume's dtype. Needs `geometry`."""
        if self.geometry is None:
            raise ValueError("loss_and_gradient: this LinearInformation was built without the map's geometry")
        expected = {"rigid": 6, "affine": 12}.get(kind)
        if expected is None or parameters.numel() != expected:
            raise ValueError(f"parameters: a {kind} transform takes {expected} values, got {parameters.numel()}")
        parameters = parameters.detach().contiguous()
        gradient = torch.empty_like(parameters)
        information = self.parameter_kernel(
            self.moving.data_ptr(), *self.moving.shape, self.points.data_ptr(), self.fixed.data_ptr(),
            self.fixed.numel(), parameters.data_ptr(), int(kind == "rigid"), self.geometry.data_ptr(),
            self.ranges.ctypes.data, self.bins, self.scratch.data_ptr(), gradient.data_ptr(),
        )
        return -information, gradient


_KERNEL_BINS = 256  # sampler.c's MATTES_BINS_MAX


def load_kernels() -> None:
    """Compile or load the histogram and gradient kernels for float32 and float64 now."""
    for dtype in (torch.float32, torch.float64):
        values = torch.linspace(0.0, 1.0, 8, dtype=dtype)
        moving = values.flip(0).clone().requires_grad_(True)
        compiled_information(values, moving, bins=8, padding=2, fixed_range=(0.0, 1.0),
                             moving_range=(0.0, 1.0)).backward()
