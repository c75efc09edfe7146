"""`register_pair`: centre-of-mass initialisation, then rigid, affine and SyN, each over a pyramid.

Read as a method section:

1. Both images are held on their own grids with their voxel-to-world affines; the transform maps a
   physical point of the fixed image to one of the moving image (ITK's direction, used to resample
   the moving image onto the fixed grid).
2. Initialisation: the translation between the centres of mass; rotations are about the fixed
   image's centre of mass.
3. For each stage and each pyramid level (coarse to fine), both images are smoothed and shrunk, the
   stage's loss is built on the level, and `optimize_level` iterates until convergence.
4. Rigid (rotation + translation) and affine (matrix + translation) stages optimise physical
   parameters by scaled gradient descent. SyN keeps two displacement fields on the fixed grid, u_f and u_m, that map
   a middle space to the fixed image and to the affinely aligned moving image; each iteration
   computes the metric's gradient at the middle, smooths it by `update_sigma` voxels, scales it so
   that no voxel moves more than `learning_rate` voxels, composes it into each field, and smooths
   the total field by `total_sigma`. At the end, both fields are inverted by Newton's iteration;
   the forward transform is u_m after the inverse of u_f, the inverse transform u_f after the
   inverse of u_m. A stage whose loss turns NaN is dropped: the outputs use the stages before it.

Everything an iteration touches (images, parameters, fields, optimizer scales) is held in the arm's
current format; the final transforms are assembled and applied in float64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynomp.heap import reused_heap
from dynomp.precision.dispatch import (
    in_single_precision,
    single_precision_accumulation,
    widened_call,
    widened_dtype,
)
from dynomp.registration.config import RegistrationConfig, StageConfig
from dynomp.registration.interpolation import (
    compose_scaled,
    update_kernels,
    update_norm,
)
from dynomp.registration.metrics import Loss, build_loss, largest_intermediate
from dynomp.registration.optimizer import (
    ConvergenceMonitor,
    RegistrationDiverged,
    ScaledGradientDescent,
    optimize_level,
)
from dynomp.registration.parzen import LinearInformation
from dynomp.registration.precision import PrecisionSetting, seconds_by_format
from dynomp.registration.pyramid import PyramidLevel, build_level, smooth
from dynomp.registration.symmetric_iteration import PreparedSymmetricIteration
from dynomp.registration.transforms import (
    affine_coordinates,
    center_of_mass,
    compose,
    homogeneous,
    identity_coordinates,
    invert,
    map_points,
    resize_field,
    rotation_angles,
    rotation_matrix,
    sample,
    to_physical,
    warp,
    warp_with_gradient,
)

INVERSION_ITERATIONS = 30
# voxels: the inversion stops once every estimate is within this of -u(x + v(x)) (3e-4 mm at 3 mm voxels)
INVERSION_TOLERANCE = 1e-4
# Newton steps (transforms.invert): on the benchmark pair 5 steps reach the tolerance, where 30
# damped fixed-point steps ended near 5e-4 voxels
INVERSION_METHOD = "newton"
# the damped step (Newton's fallback where the map folds, or the whole iteration with "damped")
# goes this fraction of the way to -u(x + v(x)): 1 is the plain fixed-point iteration, which
# oscillates where the map stretches by 2x or more
INVERSION_DAMPING = 0.5


@dataclass
class RegistrationResult:
    """What a registration produced: the transforms, the per-iteration trace and the outcome."""

    status: str
    transform: np.ndarray
    forward_displacement: np.ndarray
    inverse_displacement: np.ndarray
    moving_coordinates: np.ndarray
    trace: list[dict[str, Any]]
    final_losses: dict[str, float]
    seconds: float
    diverged_at: dict[str, Any] | None = None
    seconds_by_format: dict[str, float] = field(default_factory=dict)
    # with RegistrationConfig.reference_losses: each level's final state, its loss in float64
    reference_losses: dict[str, float] = field(default_factory=dict)

    def warp_moving(self, moving: np.ndarray, *, labels: bool = False) -> np.ndarray:
        """A moving-grid volume resampled onto the fixed grid (nearest neighbour for labels)."""
        volume = torch.as_tensor(np.asarray(moving, dtype=np.float64))
        coordinates = torch.as_tensor(self.moving_coordinates)
        mode = "nearest" if labels else "bilinear"
        values = sample(volume, coordinates, mode=mode, padding="zeros").numpy()
        return np.rint(values).astype(np.int32) if labels else values


def grid_affine(affine: np.ndarray, dimensions: int) -> torch.Tensor:
    """The (D+1)x(D+1) voxel-to-world matrix of a D-dimensional image from a NIfTI 4x4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if dimensions == 3:
        return torch.as_tensor(affine)
    keep = [*range(dimensions), 3]
    return torch.as_tensor(affine[np.ix_(keep, keep)])


def _volume_tensor(volume: Any, name: str, device: torch.device) -> torch.Tensor:
    data = np.asarray(volume.data, dtype=np.float64)
    if data.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D or 3-D image, got {data.ndim}-D")
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: the image has NaN or infinite voxels")
    return torch.as_tensor(data, device=device)


@dataclass
class _Images:
    """Both images at one level, in the current format."""

    fixed: PyramidLevel
    moving: PyramidLevel


class _Pyramid:
    """Both images' pyramid levels, each built once per (shrink factor, sigma) and shared by the
    stages that ask for it (the paper's rigid, affine and SyN stages use the same four levels)."""

    def __init__(self, fixed: torch.Tensor, fixed_affine: torch.Tensor, moving: torch.Tensor,
                 moving_affine: torch.Tensor) -> None:
        self.fixed, self.fixed_affine = fixed, fixed_affine
        self.moving, self.moving_affine = moving, moving_affine
        self._built: dict[tuple[int, float], _Images] = {}

    def level(self, stage: StageConfig, level: int) -> _Images:
        """The smoothed and shrunk images of `stage`'s pyramid level `level`."""
        key = (int(stage.shrink_factors[level]), float(stage.smoothing_sigmas[level]))
        if key not in self._built:
            factor, sigma = key
            self._built[key] = _Images(
                fixed=build_level(self.fixed, self.fixed_affine, shrink_factor=factor, sigma=sigma),
                moving=build_level(self.moving, self.moving_affine, shrink_factor=factor, sigma=sigma),
            )
        return self._built[key]


class LinearProblem:
    """Rigid or affine parameters at one level: y = M (x - c) + c + t in physical space."""

    def __init__(self, *, kind: str, images: _Images, parameters: torch.Tensor, center: torch.Tensor,
                 loss: Loss, learning_rate: float, setting: PrecisionSetting, relaxation: float) -> None:
        self.kind = kind
        self.dimensions = images.fixed.data.dim()
        self.fixed_affine = images.fixed.affine
        self.moving_affine = images.moving.affine
        self.moving_inverse = torch.linalg.inv(self.moving_affine.to(dtype=torch.float64))
        self.shape = tuple(images.fixed.data.shape)
        self.center = center
        self.loss = loss
        # MI reads a regular sample of the voxels: resample the moving image at those voxels only
        self.sample_index = getattr(loss, "sample_index", None)
        points, fixed_values = self._sampled(images, parameters.device)
        self.points = setting.cast(points)
        self.fixed = setting.cast(fixed_values)
        self.moving = setting.cast(images.moving.data)
        # dynomp keeps the few parameters in at least fp32 (master copies, as mixed-precision
        # training keeps fp32 weights) and evaluates in the step's format. Held in bf16, a 4 mm
        # translation moves in 0.03 mm steps, and the rigid levels stalled 2-4 % above fp64's loss.
        # It maps the points in at least fp32 too, from the master copies (`evaluate`)
        self.master = setting.adaptive
        self.working = setting.cast
        if self.master:
            self.master_points = points.to(widened_dtype(setting.dtype))
            self.parameters = parameters.detach().to(widened_dtype(setting.dtype))
        else:
            self.parameters = setting.cast(parameters)
        self._prepare_fused()
        spacing = float(np.mean(np.linalg.norm(self.fixed_affine[: self.dimensions, : self.dimensions].numpy(), axis=0)))
        corners = identity_coordinates([2] * self.dimensions, dtype=torch.float64) * torch.tensor(
            [n - 1 for n in self.shape], dtype=torch.float64
        ).reshape(self.dimensions, *([1] * self.dimensions))
        radius = float((to_physical(corners, self.fixed_affine).reshape(self.dimensions, -1)
                        - center.cpu().reshape(-1, 1)).norm(dim=0).max())
        linear_count = parameters.numel() - self.dimensions
        scales = [max(radius, 1e-6)] * linear_count + [1.0] * self.dimensions
        # a step moves the farthest voxel by learning_rate voxels of this level, less once relaxed
        self.optimizer = ScaledGradientDescent(
            torch.tensor(scales, dtype=torch.float64, device=parameters.device),
            max_shift=learning_rate * spacing, relaxation=relaxation,
        )

    def _sampled(self, images: _Images, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 voxel points the loss reads and the fixed image's values there: every voxel,
        or MI's regular sample."""
        points = identity_coordinates(self.shape, dtype=torch.float64, device=device)
        fixed_values = images.fixed.data
        if self.sample_index is not None:
            points = points.reshape(self.dimensions, -1)[:, self.sample_index]
            fixed_values = fixed_values.reshape(-1)[self.sample_index]
        return points, fixed_values

    def _loss_at(self, fixed_values: torch.Tensor, moving_values: torch.Tensor) -> torch.Tensor:
        """The loss of the moving image's values at the sampled points."""
        if self.sample_index is not None:
            return self.loss.on_samples(fixed_values, moving_values)
        return self.loss(fixed_values, moving_values)

    def matrix(self, parameters: torch.Tensor) -> torch.Tensor:
        """The homogeneous transform of a parameter vector."""
        return linear_transform(self.kind, parameters, center=self.center, dimensions=self.dimensions)

    def _prepare_fused(self) -> None:
        """MI's fused kernel for the current format's tensors (`information`, None where it does
        not apply), with the map's fixed geometry in the format's dtype."""
        self.information = None
        mattes = getattr(self.loss, "information", None)
        if mattes is None or not LinearInformation.applies(self.moving, self.points, self.fixed, bins=mattes.bins):
            return
        self.information = LinearInformation(
            moving=self.moving, points=self.points, fixed=self.fixed, bins=mattes.bins, padding=mattes.padding,
            fixed_range=mattes.fixed_range, moving_range=mattes.moving_range,
            geometry=(self.center, self.moving_inverse, self.fixed_affine),
        )

    def evaluate(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and its gradient with respect to the parameter vector.

        MI on CPU float32/float64 volumes is one compiled call (`parzen.LinearInformation`);
        elsewhere, and under an emulated format, the points are mapped and sampled and the loss
        built from torch operations (the same quantity, to rounding).
        """
        if self.information is not None and _get_current_dispatch_mode() is None:
            return self._fused_evaluate()
        if self.master:
            # the map from the master copies, unrounded both ways: rounded to bf16, the matrix alone
            # moves a voxel 77 voxels from the centre by 0.15 voxels; the step's format is the images'
            parameters = self.parameters.detach().requires_grad_(True)
            coordinates = widened_call(self._mapped, parameters, self.master_points, rounded=(False, False))
        else:
            parameters = self.working(self.parameters).requires_grad_(True)
            coordinates = self._mapped(parameters, self.points)
        loss = self._loss_at(self.fixed, sample(self.moving, coordinates, wide_points=self.master))
        (gradient,) = torch.autograd.grad(loss, parameters)
        return loss.detach(), [gradient]

    def _mapped(self, parameters: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The voxel points of the moving image the fixed image's `points` map to."""
        return map_points(self.matrix(parameters), fixed_affine=self.fixed_affine,
                          moving_affine=self.moving_affine, points=points, moving_inverse=self.moving_inverse)

    def _fused_evaluate(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`evaluate` through the fused kernel: the map, MI and the chain rule back to the parameters
        in one compiled call, in the parameters' working dtype (`LinearInformation.loss_and_gradient`).
        Through NumPy, the 4 x 4 products of the chain rule were most of a coarse level's iteration."""
        working = self.working(self.parameters)
        loss, gradient = self.information.loss_and_gradient(working, self.kind)
        return torch.tensor(loss, dtype=working.dtype), [gradient]

    def reference_loss(self, images: _Images) -> float:
        """The loss of the current parameters in float64, on the level's float64 images (`images`,
        as the pyramid built them): what the level's result is worth, unrounded."""
        wide = torch.float64
        with torch.no_grad():
            points, fixed_values = self._sampled(images, self.parameters.device)
            coordinates = map_points(
                self.matrix(self.parameters.detach().to(wide)), fixed_affine=self.fixed_affine,
                moving_affine=self.moving_affine, points=points, moving_inverse=self.moving_inverse,
            )
            return float(self._loss_at(fixed_values.to(wide), sample(images.moving.data.to(wide), coordinates)))

    def step(self, gradients: list[torch.Tensor]) -> None:
        """One scaled gradient-descent step (of the master copies, unrounded, for dynomp)."""
        if self.master:
            with single_precision_accumulation():
                self.parameters = self.optimizer.step(self.parameters, gradients[0].to(self.parameters.dtype))
            return
        self.parameters = self.optimizer.step(self.parameters, gradients[0])

    def state(self) -> list[torch.Tensor]:
        """The parameter vector."""
        return [self.parameters]

    def cast(self, setting: PrecisionSetting) -> None:
        """Images, sample points, parameters and the optimizer's scales to the new format (dynomp's
        master parameters and scales to fp32, or fp64 where the format is fp64: unrounded)."""
        self.points = setting.cast(self.points)
        self.fixed = setting.cast(self.fixed)
        self.moving = setting.cast(self.moving)
        if self.master:
            dtype = widened_dtype(setting.dtype)
            self.parameters = self.parameters.to(dtype)
            self.master_points = self.master_points.to(dtype)
            self.optimizer.cast(lambda tensor: tensor.to(dtype))
        else:
            self.parameters = setting.cast(self.parameters)
            self.optimizer.cast(setting.cast)
        self._prepare_fused()


class SymmetricProblem:
    """SyN at one level: the fields u_f and u_m from the middle space to each image."""

    def __init__(self, *, fixed: torch.Tensor, moving: torch.Tensor, fixed_field: torch.Tensor,
                 moving_field: torch.Tensor, loss: Loss, stage: StageConfig,
                 setting: PrecisionSetting) -> None:
        # contiguous once here: the finest level's images are views of the loaded arrays (NIfTI
        # data is column-major), which every warp would otherwise copy
        self.fixed = setting.cast(fixed).contiguous()
        self.moving = setting.cast(moving).contiguous()
        self.fixed_field = setting.cast(fixed_field)
        self.moving_field = setting.cast(moving_field)
        self.loss = loss
        self.stage = stage
        self.dimensions = fixed.dim()
        # the gradients are of loss x this power of two near the voxel count. The step normalises
        # its direction, so fp32 and fp64 steps are the same bit for bit, while a 16-bit gradient of
        # a mean over N voxels (about 1/N at a voxel) stays out of fp16's subnormal range
        self.loss_scale = 2.0 ** round(math.log2(max(1, fixed.numel())))
        self._prepare()

    def _prepare(self) -> None:
        """At a coarse level, the compiled evaluation and step with their arguments prepared for the
        current format (`symmetric_iteration`); None where they do not apply."""
        self.prepared = PreparedSymmetricIteration.prepare(
            fixed=self.fixed, moving=self.moving, fields=(self.fixed_field, self.moving_field), loss=self.loss,
            update_sigma=self.stage.update_sigma, learning_rate=self.stage.learning_rate,
            loss_scale=self.loss_scale,
        )

    def evaluate(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss at the middle and its gradients with respect to both fields.

        With local CC on CPU float32/float64 volumes, the warps, CC and the chain rule back to the
        fields are compiled calls made in turn (`_compiled_evaluate`); elsewhere autograd takes the
        gradient of the same quantity through torch operations.
        """
        if (self.prepared is not None and _get_current_dispatch_mode() is None
                and self.prepared.accepts(self.fixed, self.moving, self.fixed_field, self.moving_field)):
            return self.prepared.evaluate(self.fixed_field, self.moving_field)
        compiled = self._compiled_evaluate()
        if compiled is not None:
            return compiled
        fixed_field = self.fixed_field.detach().requires_grad_(True)
        moving_field = self.moving_field.detach().requires_grad_(True)
        loss = self.loss(warp(self.fixed, fixed_field), warp(self.moving, moving_field))
        # scaled in at least fp32 both ways (2^18 is past fp16's range); not as autograd.grad's
        # grad_outputs, which import sympy on their first call in a process (about 1 s)
        # (the loss is single precision in every format, and so is its gradient, the scale itself)
        scaled = in_single_precision(lambda value: value * self.loss_scale, loss, rounded=(False,))
        fixed_gradient, moving_gradient = torch.autograd.grad(scaled, [fixed_field, moving_field])
        return loss.detach(), [fixed_gradient, moving_gradient]

    def _compiled_evaluate(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """`evaluate` as compiled calls made in turn, without autograd: both warps, CC's value and
        image gradients (of loss x loss scale), and each warp's backward; the same values bit for bit.
        At the coarse levels autograd's bookkeeping was most of an iteration. None where a kernel
        does not apply (the loss is not local CC, another device or format, no compiler)."""
        applies = getattr(self.loss, "compiled_applies", None)
        if applies is None or not applies(self.fixed, self.moving):
            return None
        fixed_warp = warp_with_gradient(self.fixed, self.fixed_field)
        moving_warp = warp_with_gradient(self.moving, self.moving_field)
        if fixed_warp is None or moving_warp is None:
            return None
        (warped_fixed, fixed_backward), (warped_moving, moving_backward) = fixed_warp, moving_warp
        found = self.loss.value_and_gradients(warped_fixed, warped_moving, scale=self.loss_scale)
        if found is None:
            return None
        loss, grad_fixed, grad_moving = found
        del fixed_warp, moving_warp, warped_fixed, warped_moving
        return loss, [fixed_backward(grad_fixed), moving_backward(grad_moving)]

    def _update(self, field_: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """`field_` after one step along the smoothed, normalised `gradient`, the total field then
        smoothed by `total_sigma` (`field_` itself where the gradient is zero)."""
        if (self.prepared is not None and _get_current_dispatch_mode() is None
                and self.prepared.accepts(self.fixed, self.moving, field_, gradient)):
            total = self.prepared.update(field_, gradient)
        else:
            total = self._composed(field_, gradient)
        if total is field_ or self.stage.total_sigma <= 0:
            return total
        return smooth(total, self.stage.total_sigma, dimensions=self.dimensions)

    def _composed(self, field_: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """`field_` composed with the smoothed gradient scaled to `learning_rate` voxels at most
        (`field_` itself where the gradient is zero)."""
        direction = smooth(gradient, self.stage.update_sigma, dimensions=self.dimensions)
        # on the CPU the norm and the composition are one compiled pass each, with the same values
        # bit for bit: no squared, scaled or warped field is allocated in between
        contiguous = field_.contiguous()
        fused = (_get_current_dispatch_mode() is None and direction.dtype == field_.dtype
                 and update_kernels(contiguous, direction))
        if fused:
            largest = torch.tensor(update_norm(direction), dtype=direction.dtype).sqrt()
        else:
            # sum of squares over the components: norm(dim=0) took 46-120 ms on a 3 x 65 x 77 x 63 field, this 3 ms
            largest = (direction * direction).sum(0).max().sqrt()
        if not bool(largest > 0):
            return field_
        scale = -self.stage.learning_rate / largest
        if fused:
            return compose_scaled(contiguous, direction, float(scale))
        return compose(field_, direction * scale)

    def reference_loss(self, fixed: torch.Tensor, moving: torch.Tensor) -> float:
        """The loss of the current fields in float64, on float64 images (the level's fixed image
        and the affinely aligned moving image, before they were cast to the problem's format)."""
        wide = torch.float64
        with torch.no_grad():
            return float(self.loss(warp(fixed.to(wide), self.fixed_field.to(wide)),
                                   warp(moving.to(wide), self.moving_field.to(wide))))

    def step(self, gradients: list[torch.Tensor]) -> None:
        """Compose a smoothed, normalised gradient step into each field."""
        self.fixed_field = self._update(self.fixed_field, gradients[0])
        self.moving_field = self._update(self.moving_field, gradients[1])

    def state(self) -> list[torch.Tensor]:
        """Both fields."""
        return [self.fixed_field, self.moving_field]

    def cast(self, setting: PrecisionSetting) -> None:
        """Images and fields to the new format (SyN's step keeps no optimizer moments)."""
        self.fixed = setting.cast(self.fixed).contiguous()
        self.moving = setting.cast(self.moving).contiguous()
        self.fixed_field = setting.cast(self.fixed_field)
        self.moving_field = setting.cast(self.moving_field)
        self._prepare()


def linear_transform(kind: str, parameters: torch.Tensor, *, center: torch.Tensor,
                     dimensions: int) -> torch.Tensor:
    """The homogeneous physical transform of a rigid or affine parameter vector."""
    linear = parameters[:-dimensions]
    translation = parameters[-dimensions:]
    if kind == "rigid":
        matrix = rotation_matrix(linear)
    else:
        matrix = linear.reshape(dimensions, dimensions)
    return homogeneous(matrix, translation, center.to(device=parameters.device, dtype=parameters.dtype))


def _initial_parameters(kind: str, transform: torch.Tensor, center: torch.Tensor,
                        dimensions: int) -> torch.Tensor:
    """The stage's parameter vector that reproduces `transform` (rotations about `center`)."""
    matrix = transform[:dimensions, :dimensions]
    translation = transform[:dimensions, dimensions] - center + matrix @ center
    linear = rotation_angles(matrix) if kind == "rigid" else matrix.reshape(-1)
    return torch.cat([linear, translation])


def register_pair(*, fixed: Any, moving: Any, config: RegistrationConfig, precision: str,
                  device: str | torch.device = "cpu") -> RegistrationResult:
    """Register `moving` to `fixed` (objects with .data and .affine) with the engine arm `precision`."""
    with reused_heap():
        return _register_pair(fixed=fixed, moving=moving, config=config, precision=precision, device=device)


def _register_pair(*, fixed: Any, moving: Any, config: RegistrationConfig, precision: str,
                   device: str | torch.device) -> RegistrationResult:
    device = torch.device(device)
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    fixed_data = _volume_tensor(fixed, "fixed", device)
    moving_data = _volume_tensor(moving, "moving", device)
    dimensions = fixed_data.dim()
    if moving_data.dim() != dimensions:
        raise ValueError(
            f"moving: {moving_data.dim()}-D image where the fixed image is {dimensions}-D"
        )
    fixed_affine = grid_affine(fixed.affine, dimensions)
    moving_affine = grid_affine(moving.affine, dimensions)
    setting = PrecisionSetting(precision, device=device, config=config.precision)
    torch.manual_seed(config.seed)

    center = center_of_mass(fixed_data, fixed_affine).cpu()
    transform = torch.eye(dimensions + 1, dtype=torch.float64)
    if config.initialize_center_of_mass:
        transform[:dimensions, dimensions] = center_of_mass(moving_data, moving_affine).cpu() - center
    trace: list[dict[str, Any]] = []
    final_losses: dict[str, float] = {}
    reference_losses: dict[str, float] | None = {} if config.reference_losses else None
    syn_fields: list[torch.Tensor] = []
    diverged_at = None
    pyramid = _Pyramid(fixed_data, fixed_affine, moving_data, moving_affine)
    try:
        for stage in config.stages:
            if stage.name in ("rigid", "affine"):
                transform = _linear_stage(
                    stage, transform=transform, center=center, pyramid=pyramid, setting=setting,
                    trace=trace, final_losses=final_losses, seed=config.seed, device=device,
                    reference_losses=reference_losses,
                )
            else:
                syn_fields[:] = _symmetric_stage(
                    stage, transform=transform, pyramid=pyramid, setting=setting,
                    trace=trace, final_losses=final_losses, reference_losses=reference_losses,
                )
    except RegistrationDiverged as error:
        diverged_at = {"stage": error.stage, "level": error.level, "iteration": error.iteration}

    shape = tuple(fixed_data.shape)
    if not syn_fields:
        forward_field = torch.zeros(dimensions, *shape, dtype=torch.float64, device=device)
        backward_field = forward_field
    else:
        forward_field, backward_field = _assemble_fields(syn_fields, shape)
    transform_device = transform.to(device)
    moving_coordinates = affine_coordinates(
        transform_device, fixed_affine=fixed_affine, moving_affine=moving_affine, shape=shape,
        displacement=forward_field,
    )
    del forward_field, pyramid
    forward_displacement = to_physical(moving_coordinates, moving_affine)
    forward_displacement -= to_physical(identity_coordinates(shape, dtype=torch.float64, device=device), fixed_affine)
    inverse_displacement = _inverse_displacement(
        transform_device, backward_field, fixed_affine=fixed_affine, moving_affine=moving_affine,
        moving_shape=tuple(moving_data.shape),
    )
    return RegistrationResult(
        status="diverged" if diverged_at else "completed",
        transform=transform.numpy(),
        forward_displacement=np.moveaxis(forward_displacement.cpu().numpy(), 0, -1),
        inverse_displacement=np.moveaxis(inverse_displacement.cpu().numpy(), 0, -1),
        moving_coordinates=moving_coordinates.cpu().numpy(),
        trace=trace,
        final_losses=final_losses,
        seconds=time.perf_counter() - started,
        diverged_at=diverged_at,
        seconds_by_format=seconds_by_format(trace),
        reference_losses=reference_losses or {},
    )


def _assemble_fields(fields: list[torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """SyN's forward (u_m after u_f^-1) and inverse (u_f after u_m^-1) fields, in float64 on `shape`.

    `fields` is [u_f, u_m]; it is emptied, so that each field is freed once used: one inverse at a
    time, at most five fields held. The inversions and compositions run in the fields' own format
    (the arm's last: float64 for fp64, float32 for fp32 and for dynomp when its last iterations ran
    in fp32; float32 at least), and the results are cast to float64 for the outputs: an inverse
    converged to 1e-4 voxels is far coarser than float32's rounding of a displacement.
    """
    fixed_field, moving_field = fields
    fields.clear()
    dtype = torch.float64 if fixed_field.dtype == torch.float64 else torch.float32
    fixed_field = resize_field(fixed_field.to(dtype), shape)
    moving_field = resize_field(moving_field.to(dtype), shape)
    inverse = invert(fixed_field, iterations=INVERSION_ITERATIONS, tolerance=INVERSION_TOLERANCE,
                     damping=INVERSION_DAMPING, method=INVERSION_METHOD)
    forward_field = compose(moving_field, inverse).to(torch.float64)
    inverse = invert(moving_field, iterations=INVERSION_ITERATIONS, tolerance=INVERSION_TOLERANCE,
                     damping=INVERSION_DAMPING, method=INVERSION_METHOD)
    del moving_field
    backward_field = compose(fixed_field, inverse).to(torch.float64)
    return forward_field, backward_field


def _inverse_displacement(transform: torch.Tensor, backward_field: torch.Tensor, *,
                          fixed_affine: torch.Tensor, moving_affine: torch.Tensor,
                          moving_shape: tuple[int, ...]) -> torch.Tensor:
    """Physical displacement, on the moving grid, of the map from moving points to fixed points."""
    device = backward_field.device
    moving_points = to_physical(
        identity_coordinates(moving_shape, dtype=torch.float64, device=device), moving_affine
    )
    to_fixed_voxels = torch.linalg.inv(fixed_affine.to(device)) @ torch.linalg.inv(transform)
    fixed_voxels = to_physical(moving_points, to_fixed_voxels)
    fixed_voxels += sample(backward_field, fixed_voxels, padding="border")
    displacement = to_physical(fixed_voxels, fixed_affine)
    displacement -= moving_points
    return displacement


def _start_level(setting: PrecisionSetting, stage: StageConfig, *, fixed: torch.Tensor,
                 moving: torch.Tensor) -> None:
    """A fresh controller window for a level, told the largest value the level's metric computes."""
    setting.start_level(working_magnitude=largest_intermediate(
        stage.metric, fixed=fixed, moving=moving, radius=stage.cc_radius,
        samples=math.ceil(fixed.numel() * stage.sampling_fraction),
    ))


def _linear_stage(stage: StageConfig, *, transform: torch.Tensor, center: torch.Tensor,
                  pyramid: _Pyramid, setting: PrecisionSetting,
                  trace: list[dict[str, Any]], final_losses: dict[str, float], seed: int,
                  device: torch.device, reference_losses: dict[str, float] | None = None) -> torch.Tensor:
    """Run a rigid or affine stage over its pyramid; return the new physical transform.

    `reference_losses`: where given, each level's final state's float64 loss is added to it."""
    dimensions = pyramid.fixed.dim()
    parameters = _initial_parameters(stage.name, transform, center, dimensions)
    for level in range(stage.levels):
        images = pyramid.level(stage, level)
        loss = build_loss(
            stage.metric, fixed=images.fixed.data, moving=images.moving.data,
            bins=stage.metric_bins, radius=stage.cc_radius,
            sampling_fraction=stage.sampling_fraction, seed=seed + level,
        )
        _start_level(setting, stage, fixed=images.fixed.data, moving=images.moving.data)
        problem = LinearProblem(
            kind=stage.name, images=images, parameters=parameters.to(device), center=center.to(device),
            loss=loss, learning_rate=stage.learning_rate, setting=setting, relaxation=stage.relaxation,
        )
        final_losses[f"{stage.name}/{level}"] = optimize_level(
            problem, iterations=stage.iterations[level],
            monitor=ConvergenceMonitor(stage.convergence_window, stage.convergence_threshold),
            setting=setting, stage=stage.name, level=level, trace=trace,
        )
        if reference_losses is not None:
            reference_losses[f"{stage.name}/{level}"] = problem.reference_loss(images)
        parameters = problem.parameters.detach().to(torch.float64).cpu()
    with torch.no_grad():
        return linear_transform(stage.name, parameters, center=center, dimensions=dimensions)


def _symmetric_stage(stage: StageConfig, *, transform: torch.Tensor, pyramid: _Pyramid,
                     setting: PrecisionSetting, trace: list[dict[str, Any]],
                     final_losses: dict[str, float],
                     reference_losses: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SyN over its pyramid; return the fields u_f and u_m at the last level's grid, in the last format.

    `reference_losses`: where given, each level's final state's float64 loss is added to it (the
    level's float64 images are then kept beside the problem's copies)."""
    dimensions = pyramid.fixed.dim()
    device = pyramid.fixed.device
    # the fields stay in the arm's format between levels (no float64 copies held beside them)
    fixed_field = moving_field = None
    for level in range(stage.levels):
        images = pyramid.level(stage, level)
        shape = tuple(images.fixed.data.shape)
        # the moving image, affinely aligned, on this level's fixed grid
        coordinates = affine_coordinates(
            transform.to(device), fixed_affine=images.fixed.affine,
            moving_affine=images.moving.affine, shape=shape,
        )
        aligned = sample(images.moving.data, coordinates)
        del coordinates
        if fixed_field is None:
            fixed_field = torch.zeros(dimensions, *shape, dtype=setting.dtype, device=device)
            moving_field = torch.zeros_like(fixed_field)
        else:
            fixed_field = resize_field(fixed_field, shape)
            moving_field = resize_field(moving_field, shape)
        loss = build_loss(stage.metric, fixed=images.fixed.data, moving=aligned,
                          bins=stage.metric_bins, radius=stage.cc_radius,
                          sampling_fraction=stage.sampling_fraction)
        _start_level(setting, stage, fixed=images.fixed.data, moving=aligned)
        problem = SymmetricProblem(
            fixed=images.fixed.data, moving=aligned, fixed_field=fixed_field,
            moving_field=moving_field, loss=loss, stage=stage, setting=setting,
        )
        reference_images = (images.fixed.data, aligned) if reference_losses is not None else None
        # the problem holds its own copies in the current format
        del images, aligned, fixed_field, moving_field
        final_losses[f"syn/{level}"] = optimize_level(
            problem, iterations=stage.iterations[level],
            monitor=ConvergenceMonitor(stage.convergence_window, stage.convergence_threshold),
            setting=setting, stage=stage.name, level=level, trace=trace,
        )
        if reference_images is not None:
            reference_losses[f"syn/{level}"] = problem.reference_loss(*reference_images)
            reference_images = None
        fixed_field, moving_field = problem.fixed_field.detach(), problem.moving_field.detach()
        del problem
    return fixed_field, moving_field
