"""Similarity metrics, written as losses to minimise: Mattes mutual information, local CC, MSE.

All three are differentiable, so autograd gives the gradient with respect to transform parameters
or displacement fields, in whatever dtype the images are held in. MI and local CC have their
gradients written out (`dynomp.registration.parzen` compiles MI's histogram and gradient for CPU
float32/float64 tensors; elsewhere, and under an emulated format, MI is torch operations).

- Mattes MI (Mattes et al. 2003, ANTs' `MI[...,32]`): a joint histogram of 32 x 32 bins built by
  Parzen windowing with a cubic B-spline kernel on both images, over a regular subsample of the
  voxels (`sampling_fraction`, ANTs' `Regular,0.25`). Loss = -MI.
- Local cross-correlation (ANTs' `CC[...,radius]`): squared correlation over a (2r+1)^D box around
  every voxel, with the box sums from separable filters (cumulative sums would lose every bit
  of a 16-bit format on a 100-voxel line). Loss = -mean CC.
- Mean squared error of intensities.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynomp import native
from dynomp.precision.dispatch import (
    in_single_precision,
    narrow,
    single_precision_accumulation,
    widen,
)
from dynomp.registration.parzen import compiled_information
from dynomp.registration.pyramid import separable_filter

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Parzen bins kept free at each end so the B-spline support of extreme values stays in range
_PADDING_BINS = 2


def cubic_bspline(distance: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel (support |t| < 2, integral 1)."""
    t = distance.abs()
    inner = (4.0 - 6.0 * t**2 + 3.0 * t**3) / 6.0
    outer = (2.0 - t).clamp(min=0.0) ** 3 / 6.0
    return torch.where(t < 1.0, inner, outer)


def parzen_weights(values: torch.Tensor, *, low: float, high: float, bins: int) -> torch.Tensor:
    """N x bins B-spline weights of `values` mapped linearly from [low, high] onto the bins."""
    first_bin, weights = parzen_taps(values, low=low, high=high, bins=bins)
    dense = torch.zeros(values.numel(), bins, dtype=weights.dtype, device=weights.device)
    return dense.scatter(1, first_bin.unsqueeze(-1) + _TAP_OFFSETS.to(first_bin.device), weights)


_TAP_OFFSETS = torch.arange(4)


def parzen_taps(values: torch.Tensor, *, low: float, high: float, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four bins a cubic B-spline window touches per value: (first bin, N; weights, N x 4).

    A value at bin position q touches bins floor(q) - 1 .. floor(q) + 2, with the uniform cubic
    B-spline's four basis polynomials of f = q - floor(q) as weights. That is the kernel evaluated
    at those bins only: the same numbers as at all `bins` centres, for 8x less work at 32 bins.
    """
    span = high - low if high > low else 1.0
    usable = bins - 1 - 2 * _PADDING_BINS
    position = (values.reshape(-1) - low) * (usable / span) + _PADDING_BINS
    position = position.clamp(_PADDING_BINS, bins - 1 - _PADDING_BINS)
    # a NaN value (a diverging low-precision run) gets a valid bin and NaN weights, so the metric
    # turns NaN and the run ends as "diverged" instead of indexing out of range
    floor = torch.nan_to_num(position.detach(), nan=float(_PADDING_BINS)).floor()
    fraction = position - floor
    fraction_squared = fraction * fraction
    fraction_cubed = fraction_squared * fraction
    complement = 1.0 - fraction
    weights = torch.stack([
        complement * complement * complement,
        3.0 * fraction_cubed - 6.0 * fraction_squared + 4.0,
        -3.0 * fraction_cubed + 3.0 * fraction_squared + 3.0 * fraction + 1.0,
        fraction_cubed,
    ], dim=-1) / 6.0
    return floor.long() - 1, weights


def joint_histogram(
    fixed_taps: tuple[torch.Tensor, torch.Tensor], moving_taps: tuple[torch.Tensor, torch.Tensor], *, bins: int
) -> torch.Tensor:
    """The normalised bins x bins Parzen joint histogram from both images' four-tap windows."""
    cells, products = _cells_and_products(fixed_taps, moving_taps, bins=bins)
    return _normalised_histogram(cells, products, bins=bins)


def _cells_and_products(
    fixed_taps: tuple[torch.Tensor, torch.Tensor], moving_taps: tuple[torch.Tensor, torch.Tensor], *, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 joint-histogram cells each sample touches (flat indices) and their weights."""
    fixed_first, fixed_weights = fixed_taps
    moving_first, moving_weights = moving_taps
    offsets = _TAP_OFFSETS.to(fixed_first.device)
    rows = (fixed_first.unsqueeze(-1) + offsets) * bins
    columns = moving_first.unsqueeze(-1) + offsets
    cells = (rows.unsqueeze(-1) + columns.unsqueeze(-2)).reshape(-1)
    products = (fixed_weights.unsqueeze(-1) * moving_weights.unsqueeze(-2)).reshape(-1)
    return cells, products


def _normalised_histogram(cells: torch.Tensor, products: torch.Tensor, *, bins: int) -> torch.Tensor:
    joint = torch.zeros(bins * bins, dtype=products.dtype, device=products.device).index_add(0, cells, products)
    joint = joint.reshape(bins, bins)
    return joint / joint.sum()


def mutual_information_of_histogram(joint: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) of a normalised joint histogram."""
    fixed_marginal = joint.sum(1, keepdim=True)
    moving_marginal = joint.sum(0, keepdim=True)
    tiny = torch.finfo(joint.dtype).tiny
    ratio = joint / (fixed_marginal * moving_marginal).clamp(min=tiny)
    return (joint * torch.log(ratio.clamp(min=tiny))).sum()


def mutual_information(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    *,
    bins: int = 32,
    fixed_range: tuple[float, float],
    moving_range: tuple[float, float],
) -> torch.Tensor:
    """Mattes mutual information (nats) of two equally long intensity vectors.

    On CPU float32/float64 vectors (and no emulated format) a compiled kernel computes it and its
    gradient with respect to `moving` (`dynomp.registration.parzen`); elsewhere torch operations.
    """
    if _compiled_information_applies(fixed, moving):
        return compiled_information(fixed.reshape(-1), moving.reshape(-1), bins=bins, padding=_PADDING_BINS,
                                    fixed_range=fixed_range, moving_range=moving_range)
    cells, products = _cells_and_products(
        parzen_taps(fixed, low=fixed_range[0], high=fixed_range[1], bins=bins),
        parzen_taps(moving, low=moving_range[0], high=moving_range[1], bins=bins),
        bins=bins,
    )

    # the per-sample work runs in the step's format; the histogram and MI in at least fp32. A
    # 16-bit bin stops growing at 256 (bf16) or 2048 (fp16) equal weights, and most products of
    # two marginals of a 32 x 32 histogram lie below fp16's smallest normal number (6e-5)
    def information(weights: torch.Tensor) -> torch.Tensor:
        return mutual_information_of_histogram(_normalised_histogram(cells, weights, bins=bins))

    return in_single_precision(information, products)


def _compiled_information_applies(fixed: torch.Tensor, moving: torch.Tensor) -> bool:
    return (
        fixed.device.type == "cpu" and moving.device.type == "cpu" and fixed.dtype == moving.dtype
        and moving.dtype in (torch.float32, torch.float64) and not fixed.requires_grad
        and _get_current_dispatch_mode() is None
    )


def box_sum(volume: torch.Tensor, *, radius: int, dimensions: int | None = None) -> torch.Tensor:
    """Sum over the (2r+1)^D box around every voxel (zero outside) of the last D axes.

    Separable, a filter of 2r+1 ones along each axis (see `separable_filter`); leading axes are
    batched.
    """
    dimensions = volume.dim() if dimensions is None else dimensions
    ones = (1.0,) * (2 * radius + 1)
    return separable_filter(volume, [ones] * dimensions, edges="zeros", dimensions=dimensions)


def box_count(shape: tuple[int, ...], *, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """How many voxels of the grid each (2r+1)^D box holds (fewer near the edges)."""
    count = torch.ones((), dtype=dtype, device=device)
    for axis, length in enumerate(shape):
        index = torch.arange(length, device=device)
        along = ((index + radius).clamp(max=length - 1) - (index - radius).clamp(min=0) + 1).to(dtype)
        view = [1] * len(shape)
        view[axis] = length
        count = count * along.reshape(view)
    return count


def local_cross_correlation(fixed: torch.Tensor, moving: torch.Tensor, *, radius: int = 4) -> torch.Tensor:
    """Mean over voxels of the squared local correlation in a (2r+1)^D box (ANTs' CC metric).

    Differentiable in both images, with the gradient written out (`_LocalCrossCorrelation`) rather
    than left to autograd: one batched box sum of seven maps instead of autograd's trip back
    through the forward pass's filters, and a fraction of the saved intermediates. On CPU
    float32/float64 volumes its pointwise arithmetic runs as three fused C passes
    (`correlation_kernels`); elsewhere, and under an emulated format, as torch operations.
    """
    return _LocalCrossCorrelation.apply(fixed, moving, radius)


def _window_statistics(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    dimensions = fixed.dim()
    count = box_count(tuple(fixed.shape), radius=radius, dtype=fixed.dtype, device=fixed.device)
    # the five box sums in one batched pass
    sums = box_sum(torch.stack([fixed, moving, fixed * moving, fixed * fixed, moving * moving]),
                   radius=radius, dimensions=dimensions)
    sum_fixed, sum_moving, sum_cross, sum_fixed_squares, sum_moving_squares = sums.unbind(0)
    mean_fixed = sum_fixed / count
    mean_moving = sum_moving / count
    cross = sum_cross - sum_fixed * mean_moving
    # sum of squares minus squared sum cancels: in a 16-bit format the difference can round to a
    # negative "variance", and a negative or tiny denominator turns the correlation into a huge
    # number the optimizer then chases (bf16 runs reached losses of -6e6). Variances are >= 0 and
    # the squared correlation is <= 1 (Cauchy-Schwarz), so both bounds only remove rounding error.
    fixed_variance = sum_fixed_squares - sum_fixed * mean_fixed
    moving_variance = sum_moving_squares - sum_moving * mean_moving
    # the epsilon keeps flat background (zero variance) from dividing 0 by 0
    denominator = fixed_variance.clamp(min=0) * moving_variance.clamp(min=0) + 1e-5 * count
    return {"mean_fixed": mean_fixed, "mean_moving": mean_moving, "cross": cross,
            "fixed_variance": fixed_variance, "moving_variance": moving_variance,
            "denominator": denominator}


_correlation_kernels: dict[torch.dtype, tuple[Any, Any, Any]] | None = None


def correlation_kernels() -> dict[torch.dtype, tuple[Any, Any, Any]]:
    """Local CC's fused pointwise passes (`filters.c`: products, weights, gradient) by dtype,
    compiled with the C filter; empty where it is unavailable (the torch operations run then)."""
    global _correlation_kernels
    if _correlation_kernels is None:
        library = native.library("registration/filters", fallback="BLAS matrix products")
        _correlation_kernels = {}
        if library is not None:
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            for dtype, suffix, real in ((torch.float32, "f32", ctypes.c_float),
                                        (torch.float64, "f64", ctypes.c_double)):
                kernels = (getattr(library, f"cc_products_{suffix}"), getattr(library, f"cc_weights_{suffix}"),
                           getattr(library, f"cc_gradient_{suffix}"))
                kernels[0].argtypes, kernels[0].restype = [pointer, pointer, pointer, size], None
                kernels[1].argtypes, kernels[1].restype = [pointer, size, size, size, size, pointer], real
                kernels[2].argtypes = [pointer, pointer, pointer, size, real, pointer, pointer]
                kernels[2].restype = None
                _correlation_kernels[dtype] = kernels
    return _correlation_kernels


def _correlation_kernels_for(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[Any, Any, Any] | None:
    """The fused kernels for these images, or None where the torch operations must run: another
    device, dtype or dimensionality, an emulated format (a dispatch mode rounds every operation),
    or no C compiler."""
    if (fixed.dim() != 3 or fixed.shape != moving.shape or fixed.dtype != moving.dtype
            or fixed.device.type != "cpu" or moving.device.type != "cpu"
            or _get_current_dispatch_mode() is not None):
        return None
    return correlation_kernels().get(fixed.dtype)


def _compiled_correlation(kernels: tuple[Any, Any, Any], fixed: torch.Tensor, moving: torch.Tensor,
                          radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local CC's value (a 0-d tensor) and the seven maps its gradient box-sums, by the fused C
    passes (contiguous 3-D images of one dtype)."""
    products, weights, _ = kernels
    shape, count = tuple(fixed.shape), fixed.numel()
    maps = torch.empty(5, *shape, dtype=fixed.dtype)
    products(fixed.data_ptr(), moving.data_ptr(), maps.data_ptr(), count)
    sums = box_sum(maps, radius=radius, dimensions=3)
    del maps
    gradient_maps = torch.empty(7, *shape, dtype=fixed.dtype)
    total = weights(sums.data_ptr(), *shape, radius, gradient_maps.data_ptr())
    return torch.tensor(total, dtype=fixed.dtype) / count, gradient_maps


def _compiled_correlation_gradients(
    kernels: tuple[Any, Any, Any], fixed: torch.Tensor, moving: torch.Tensor, gradient_maps: torch.Tensor,
    radius: int, grad: float, *, fixed_wanted: bool = True, moving_wanted: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`grad` times local CC's gradients with respect to each image (None where not wanted)."""
    sums = box_sum(gradient_maps, radius=radius, dimensions=3)
    grad_fixed = torch.empty_like(fixed) if fixed_wanted else None
    grad_moving = torch.empty_like(moving) if moving_wanted else None
    kernels[2](fixed.data_ptr(), moving.data_ptr(), sums.data_ptr(), fixed.numel(), grad,
               None if grad_fixed is None else grad_fixed.data_ptr(),
               None if grad_moving is None else grad_moving.data_ptr())
    return grad_fixed, grad_moving


class _LocalCrossCorrelation(torch.autograd.Function):
    """mean_w c_w, c_w = A_w^2 / (B_w C_w + eps_w), clamped to 1, and its gradient in closed form.

    With A the window's cross term, B and C its two variances (clamped at 0), a voxel x lies in the
    windows centred within r of it, so

        dL/dm(x) = (1/N) sum_{w near x} [a_w (f(x) - mean_f,w) + 2 b_w (m(x) - mean_m,w)]

    with a_w = dc_w/dA_w and b_w = dc_w/dC_w (zero where the clamps are active), and the same with
    the roles swapped for f. The sums over w near x are box sums, batched for all seven maps.
    """

    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.radius = radius
        kernels = _correlation_kernels_for(fixed, moving)
        ctx.kernels = kernels
        if kernels is not None:
            fixed, moving = fixed.detach().contiguous(), moving.detach().contiguous()
            value, gradient_maps = _compiled_correlation(kernels, fixed, moving, radius)
            ctx.save_for_backward(fixed, moving, gradient_maps)
            return value
        # the window statistics, the correlation and its mean over every voxel (the loss the
        # convergence test reads) in at least fp32, as a metric's reductions are under autocast:
        # in bf16 a window's sum of squares minus its squared sum keeps 2-3 significant bits, and
        # SyN's full-resolution loss came out 4.6 % below fp64's for the same fields
        wanted = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with single_precision_accumulation():
            stats = _window_statistics(widen(fixed), widen(moving), radius)
            cross, denominator = stats["cross"], stats["denominator"]
            correlation = cross * cross / denominator
            loss = correlation.clamp(max=1.0).mean()
            if wanted:
                # the weights of the sum over voxels, from the fp32 statistics in fp32 too (a window's
                # cross term squared passes fp16's 65504 at intensities of a few units); the backward
                # divides by the count (denominator x count overflowed fp16, which zeroed every weight)
                inside = (correlation <= 1.0).to(cross.dtype)
                scale = inside / denominator
                cross_weight = 2.0 * cross * scale
                squared = cross * cross * scale / denominator
                fixed_weight = -squared * stats["moving_variance"].clamp(min=0) * (stats["fixed_variance"] >= 0)
                moving_weight = -squared * stats["fixed_variance"].clamp(min=0) * (stats["moving_variance"] >= 0)
        if wanted:
            # the gradient's maps in the step's own format
            ctx.save_for_backward(fixed, moving, *(narrow(t, fixed.dtype) for t in (
                stats["mean_fixed"], stats["mean_moving"], cross_weight, fixed_weight, moving_weight)))
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        if ctx.kernels is not None:
            fixed, moving, gradient_maps = ctx.saved_tensors
            grad_fixed, grad_moving = _compiled_correlation_gradients(
                ctx.kernels, fixed, moving, gradient_maps, ctx.radius, float(grad),
                fixed_wanted=ctx.needs_input_grad[0], moving_wanted=ctx.needs_input_grad[1],
            )
            return grad_fixed, grad_moving, None
        fixed, moving, mean_fixed, mean_moving, cross_weight, fixed_weight, moving_weight = ctx.saved_tensors
        # d(mean)/d(sum) with the incoming gradient, in at least fp32 (a loss scale keeps it near 1:
        # unscaled, 1 / count is subnormal in fp16), then in the images' dtype
        with single_precision_accumulation():
            grad = widen(grad) / fixed.numel()
        grad = narrow(grad, fixed.dtype)
        sums = box_sum(torch.stack([
            cross_weight, cross_weight * mean_fixed, cross_weight * mean_moving,
            fixed_weight, fixed_weight * mean_fixed, moving_weight, moving_weight * mean_moving,
        ]), radius=ctx.radius, dimensions=fixed.dim())
        cross_sum, cross_fixed, cross_moving, fixed_sum, fixed_mean, moving_sum, moving_mean = sums.unbind(0)
        grad_fixed = grad_moving = None
        if ctx.needs_input_grad[0]:
            grad_fixed = grad * (moving * cross_sum - cross_moving + 2.0 * (fixed * fixed_sum - fixed_mean))
            grad_fixed = grad_fixed.to(fixed.dtype)
        if ctx.needs_input_grad[1]:
            grad_moving = grad * (fixed * cross_sum - cross_fixed + 2.0 * (moving * moving_sum - moving_mean))
            grad_moving = grad_moving.to(moving.dtype)
        return grad_fixed, grad_moving, None


def largest_intermediate(metric: str, *, fixed: torch.Tensor, moving: torch.Tensor, radius: int,
                         samples: int) -> float:
    """An upper bound on the magnitudes `metric` computes on these images (for the format's range).

    CC sums products of intensities over a (2r+1)^D box; MI adds up to `samples` Parzen weights in
    one histogram bin before normalising; MSE squares differences.
    """
    largest = max(float(fixed.detach().abs().max()), float(moving.detach().abs().max()))
    if metric == "cc":
        return (2 * radius + 1) ** fixed.dim() * largest * largest
    if metric == "mi":
        return max(largest, float(samples))
    return 4.0 * largest * largest


def mean_squared_error(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Mean of the squared intensity differences (the mean in at least fp32)."""
    squared = (fixed - moving) ** 2
    with single_precision_accumulation():
        return widen(squared).mean()


def regular_sample_index(count: int, *, fraction: float, seed: int, device: torch.device) -> torch.Tensor | None:
    """Every k-th voxel (k = round(1/fraction)) from a seeded offset; None when all voxels are used."""
    stride = max(1, round(1.0 / fraction))
    if stride == 1:
        return None
    generator = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, stride, (1,), generator=generator))
    return torch.arange(offset, count, stride, device=device)


@dataclass(frozen=True)
class MattesParameters:
    """What a Mattes MI loss was built with: its bins, both intensity ranges, the padding bins."""

    bins: int
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    padding: int = _PADDING_BINS


class SampledLoss:
    """A loss over a fixed subset of the voxels (MI's regular sample), as a callable on volumes.

    `sample_index` lists the flat voxel indices used (None: all of them). A caller that resamples the
    moving image can resample those voxels only and call `on_samples` with their values; at the
    paper's 25 % sampling that is a quarter of the interpolation and of the gradient's work.
    `information`: for MI, its parameters, so that a caller can compute the same loss in one
    compiled call (`parzen.LinearInformation`).
    """

    def __init__(self, function: Loss, sample_index: torch.Tensor | None,
                 information: MattesParameters | None = None) -> None:
        self.function = function
        self.sample_index = sample_index
        self.information = information

    def __call__(self, fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
        """The loss of two whole volumes (the sample is taken here)."""
        fixed_flat, moving_flat = fixed_values.reshape(-1), moving_values.reshape(-1)
        if self.sample_index is not None:
            fixed_flat, moving_flat = fixed_flat[self.sample_index], moving_flat[self.sample_index]
        return self.function(fixed_flat, moving_flat)

    def on_samples(self, fixed_samples: torch.Tensor, moving_samples: torch.Tensor) -> torch.Tensor:
        """The loss of the sampled voxels' values, already taken in `sample_index` order."""
        return self.function(fixed_samples, moving_samples)


class CorrelationLoss:
    """Minus local CC of radius `radius` (SyN's loss): differentiable when called, and with a
    compiled value-and-gradients path (`value_and_gradients`) where the fused C passes apply."""

    def __init__(self, radius: int) -> None:
        self.radius = radius

    def __call__(self, fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
        # the sign unrounded both ways: a scaled gradient (SymmetricProblem) passes fp16's range
        # the correlation is a single-precision value whatever the format: its gradient too
        return in_single_precision(torch.neg, local_cross_correlation(fixed_values, moving_values,
                                                                      radius=self.radius),
                                   rounded=(False,))

    @staticmethod
    def compiled_applies(fixed: torch.Tensor, moving: torch.Tensor) -> bool:
        """True where `value_and_gradients` runs for images of these tensors' device, dtype and
        dimensionality (asked before the images to compare are computed)."""
        return _correlation_kernels_for(fixed, moving) is not None

    def value_and_gradients(
        self, fixed: torch.Tensor, moving: torch.Tensor, *, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The loss, and `scale` times its gradients with respect to both images, from the fused C
        passes without autograd: the same kernels, so the same values bit for bit as calling the
        loss and taking autograd's gradient of loss x scale (a power of two). None where the passes
        do not apply (another device, dtype or dimensionality, an emulated format, no compiler)."""
        kernels = _correlation_kernels_for(fixed, moving)
        if kernels is None:
            return None
        fixed, moving = fixed.detach().contiguous(), moving.detach().contiguous()
        value, gradient_maps = _compiled_correlation(kernels, fixed, moving, self.radius)
        grad_fixed, grad_moving = _compiled_correlation_gradients(
            kernels, fixed, moving, gradient_maps, self.radius, -float(scale))
        return -value, grad_fixed, grad_moving


def build_loss(
    name: str,
    *,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    bins: int = 32,
    radius: int = 4,
    sampling_fraction: float = 1.0,
    seed: int = 0,
) -> Loss:
    """The loss `name` (mi, cc or mse) for a level, with MI's ranges and sample taken from its images."""
    if name == "mi":
        fixed_range = (float(fixed.min()), float(fixed.max()))
        moving_range = (float(moving.min()), float(moving.max()))
        index = regular_sample_index(
            fixed.numel(), fraction=sampling_fraction, seed=seed, device=fixed.device
        )

        def mi_loss(fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
            information = mutual_information(
                fixed_values, moving_values, bins=bins, fixed_range=fixed_range, moving_range=moving_range
            )
            return in_single_precision(torch.neg, information, rounded=(False,))

        return SampledLoss(mi_loss, index, MattesParameters(bins, fixed_range, moving_range))
    if name == "cc":
        return CorrelationLoss(radius)
    if name == "mse":
        return mean_squared_error
    raise ValueError(f"metric: unknown metric {name!r} (known: mi, cc, mse)")
