"""SyN's iteration at a coarse level: the C kernels called in turn with arguments prepared once.

At SyN's coarse levels (8 x 9 x 7 to 32 x 38 x 31 voxels on the benchmark pair) the Python around
an iteration's 23 kernel calls (each wrapper's checks of shapes, dtypes and devices, the choice
between the compiled and the torch path, fresh intermediates, the ctypes arguments built again)
was about half of its evaluation and step: 0.41 ms at 8 x 9 x 7 in either format, 0.22 ms with
the calls prepared (docs/benchmarks.md). `PreparedSymmetricIteration` checks once per
level and format, holds the intermediates (the box sums' maps, the warped images, the smoothed
directions) and each call's pointers, and makes the same calls in the same order as
`SymmetricProblem._compiled_evaluate` and `SymmetricProblem._composed` with their kernels
(`transforms.warp_with_gradient`, `metrics.CorrelationLoss.value_and_gradients`,
`pyramid.smooth`, `interpolation.update_norm` and `compose_scaled`): the same numbers bit for bit,
which a test holds it to.

It applies to local CC on contiguous CPU float32/float64 volumes of fewer than 2^17 voxels, with
the C kernels compiled and splitting their own loops; `prepare` returns None elsewhere, and the
general path runs. Its buffers are 34 volumes of the level: at the full-resolution level they would
raise the peak memory, and the Python it saves is about 1 % of an iteration there, so it is not
prepared there.
"""

from __future__ import annotations

from typing import Any

import torch

from dynomp.registration import interpolation, metrics, pyramid

# the largest level prepared: its buffers hold 34 volumes (10 MB at 32 x 38 x 31 in float64, 83 MB
# at the benchmark pair's full 65 x 77 x 63, where they would raise the peak memory)
_LARGEST_LEVEL = 1 << 17


class PreparedSymmetricIteration:
    """SyN's compiled evaluation and step at one level and format, with prepared arguments."""

    def __init__(self, *, fixed: torch.Tensor, moving: torch.Tensor, radius: int, update_sigma: float,
                 learning_rate: float, loss_scale: float) -> None:
        dtype = fixed.dtype
        self.dtype = dtype
        self.fixed, self.moving = fixed, moving
        self.shape = tuple(int(n) for n in fixed.shape)
        depth, height, width = self.shape
        self.voxels = fixed.numel()
        self.learning_rate = learning_rate
        self.loss_scale = float(loss_scale)
        kernels = interpolation.native_kernels()
        self._sample = kernels["sample_displaced", dtype]
        self._sample_backward = kernels["sample_displaced_backward", dtype]
        self._norm = kernels["update_norm", dtype]
        self._compose = kernels["compose_scaled", dtype]
        self._products, self._weights, self._gradient = metrics.correlation_kernels()[dtype]
        self._filter = pyramid.filter_kernels()[dtype]
        self._volume_filter = pyramid._volume_filter_kernels[dtype]
        self.radius = radius
        # the taps, as separable_filter reads them (cached tensors: kept alive by the cache and here)
        self._box_taps = pyramid._taps_tensor((1.0,) * (2 * radius + 1), dtype)
        self._smoothing_taps = (pyramid._taps_tensor(pyramid._gaussian_taps(float(update_sigma)), dtype)
                                if update_sigma > 0 else None)
        self._smoothing_radius = 0 if self._smoothing_taps is None else (self._smoothing_taps.numel() - 1) // 2

        def volumes(count: int) -> torch.Tensor:
            return torch.empty(count, *self.shape, dtype=dtype)

        self.warped_fixed, self.warped_moving = volumes(1), volumes(1)
        # each filter's passes alternate between two buffers (`_filter_axes`)
        self._maps = (volumes(5), volumes(5))
        self._gradient_maps = (volumes(7), volumes(7))
        self.image_gradients = (volumes(1), volumes(1))
        self._directions = (volumes(3), volumes(3))
        # each image's leading arguments to the displaced sampler and its backward (one channel)
        rows = depth * height
        self._warp_arguments = [
            (image.data_ptr(), 1, depth, height, width) for image in (fixed, moving)
        ]
        self._grid = (height, width, self.voxels)
        self._rows = rows

    @staticmethod
    def prepare(*, fixed: torch.Tensor, moving: torch.Tensor, fields: tuple[torch.Tensor, torch.Tensor],
                loss: Any, update_sigma: float, learning_rate: float,
                loss_scale: float) -> PreparedSymmetricIteration | None:
        """The prepared iteration for these images, fields and loss, or None where it does not apply
        (another loss, device, dtype or dimensionality, non-contiguous tensors, an emulated format,
        no compiled kernels, or a level of 2^17 voxels or more)."""
        if not isinstance(loss, metrics.CorrelationLoss):
            return None
        # the images as CC's fused passes take them (3-D CPU float32/float64 tensors of one shape and
        # dtype, no emulated format), the fields as the fused step takes them (contiguous CPU
        # float32/float64 (3, D, H, W) tensors of one shape and dtype), and the two alike
        if metrics._correlation_kernels_for(fixed, moving) is None or not interpolation.update_kernels(*fields):
            return None
        if (fields[0].dtype != fixed.dtype or fields[0].shape[1:] != fixed.shape
                or not (fixed.is_contiguous() and moving.is_contiguous())
                or any(t.requires_grad for t in (fixed, moving, *fields)) or fixed.numel() >= _LARGEST_LEVEL
                or not interpolation._native_threads or pyramid.filter_kernels().get(fixed.dtype) is None):
            return None
        return PreparedSymmetricIteration(fixed=fixed, moving=moving, radius=int(loss.radius), update_sigma=update_sigma,
                                          learning_rate=learning_rate, loss_scale=loss_scale)

    def accepts(self, fixed: torch.Tensor, moving: torch.Tensor, *fields: torch.Tensor) -> bool:
        """Whether these are the images it was prepared for and fields its calls can read: contiguous,
        of the level's shape and format (a caller may have set a problem's tensors to others since)."""
        return fixed is self.fixed and moving is self.moving and all(
            f.dtype == self.dtype and f.is_contiguous() and f.shape[1:] == self.fixed.shape and f.shape[0] == 3
            for f in fields)

    def _filter_axes(self, source: torch.Tensor, spare: torch.Tensor, target: torch.Tensor, taps: torch.Tensor,
                     radius: int, replicate: int) -> torch.Tensor:
        """`source`'s channels filtered along the three axes into `target`: in one call or in a call
        per axis (source -> target -> spare -> target; `spare` may be `source`), as
        `separable_filter` chooses (`pyramid.one_call_filter`; the same numbers bit for bit either way)."""
        batch = source.shape[0]
        depth, height, width = self.shape
        pointer = taps.data_ptr()
        if pyramid.one_call_filter(source.numel(), radius, self.dtype) and self._volume_filter(
                source.data_ptr(), target.data_ptr(), batch, depth, height, width,
                pointer, radius, pointer, radius, pointer, radius, replicate) == 0:
            return target
        self._filter(source.data_ptr(), target.data_ptr(), batch, depth, height * width, pointer, radius, replicate)
        self._filter(target.data_ptr(), spare.data_ptr(), batch * depth, height, width, pointer, radius, replicate)
        self._filter(spare.data_ptr(), target.data_ptr(), batch * depth * height, width, 1, pointer, radius,
                     replicate)
        return target

    def evaluate(self, fixed_field: torch.Tensor,
                 moving_field: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss (minus local CC) at the middle and loss_scale times its gradients with respect
        to both fields: `SymmetricProblem._compiled_evaluate`'s calls."""
        height, width, voxels = self._grid
        fields = (fixed_field, moving_field)
        warped = (self.warped_fixed, self.warped_moving)
        for image, field_, out in zip(self._warp_arguments, fields, warped, strict=True):
            self._sample(*image, field_.data_ptr(), height, width, voxels, out.data_ptr(), 0, self._rows)
        depth = self.shape[0]
        fixed_pointer, moving_pointer = self.warped_fixed.data_ptr(), self.warped_moving.data_ptr()
        self._products(fixed_pointer, moving_pointer, self._maps[0].data_ptr(), voxels)
        sums = self._filter_axes(self._maps[0], self._maps[0], self._maps[1], self._box_taps, self.radius, 0)
        total = self._weights(sums.data_ptr(), depth, height, width, self.radius, self._gradient_maps[0].data_ptr())
        value = torch.tensor(total, dtype=self.dtype) / voxels
        gradient_sums = self._filter_axes(self._gradient_maps[0], self._gradient_maps[0], self._gradient_maps[1],
                                           self._box_taps, self.radius, 0)
        grad_fixed, grad_moving = self.image_gradients
        self._gradient(fixed_pointer, moving_pointer, gradient_sums.data_ptr(), voxels, -self.loss_scale,
                       grad_fixed.data_ptr(), grad_moving.data_ptr())
        gradients = []
        for image, field_, grad_out in zip(self._warp_arguments, fields, self.image_gradients, strict=True):
            gradient = torch.empty(3, *self.shape, dtype=self.dtype)
            self._sample_backward(*image, field_.data_ptr(), height, width, voxels, grad_out.data_ptr(),
                                  gradient.data_ptr(), 0, self._rows)
            gradients.append(gradient)
        return -value, gradients

    def update(self, field_: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The field composed with the smoothed, normalised gradient (`field_` itself where the
        gradient is zero): `SymmetricProblem._composed`'s calls; the caller smooths the total field."""
        if self._smoothing_taps is None:
            direction = gradient.contiguous()
        else:
            direction = self._filter_axes(gradient.contiguous(), *self._directions, self._smoothing_taps,
                                          self._smoothing_radius, 1)
        largest = torch.tensor(self._norm(direction.data_ptr(), self.voxels), dtype=self.dtype).sqrt()
        if not bool(largest > 0):
            return field_
        scale = -self.learning_rate / largest
        out = torch.empty_like(field_)
        self._compose(field_.data_ptr(), *self.shape, direction.data_ptr(), float(scale), out.data_ptr())
        return out

