"""The per-level iteration loop: evaluate, check for NaN, step, observe precision, test convergence.

A stage (rigid, affine, SyN) hands the loop a `LevelProblem`: something that evaluates its loss and
gradients, takes a step, exposes the state the precision controller observes, and casts itself to a
new dtype. The loop is then the same for every stage and every arm.

Convergence is ANTs' window test (itk::WindowConvergenceMonitoringFunction): over the last
`window` loss values, each divided by the sum of their magnitudes and placed at t = 0..1, the
negated slope at the window's end must stay above `threshold`; a flat or rising loss stops the
level. ANTs fits a B-spline to the window; a least-squares line is used here, which agrees for the
monotone curves of a converging run and needs no fitting library.

Rigid and affine parameters move by regular-step gradient descent with ANTs' physical-shift
parameter scales (see `ScaledGradientDescent`). Adam was tried first; it turns the near-zero, noisy
gradient at an optimum into full-size steps, and on 32^3 phantoms it wandered 0.3 rad away from a
translation-only solution at the 8^3 coarse level.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynomp.registration.precision import PrecisionSetting


class RegistrationDiverged(RuntimeError):
    """The loss became NaN or infinite; carries where."""

    def __init__(self, *, stage: str, level: int, iteration: int) -> None:
        super().__init__(f"loss is not finite at stage {stage}, level {level}, iteration {iteration}")
        self.stage = stage
        self.level = level
        self.iteration = iteration


class LevelProblem(Protocol):
    """What the loop needs from a stage at one pyramid level."""

    def evaluate(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and the gradients of the observed state."""

    def step(self, gradients: list[torch.Tensor]) -> None:
        """Move the state along the (processed) negative gradients."""

    def state(self) -> list[torch.Tensor]:
        """The tensors the precision controller observes (parameters or fields)."""

    def cast(self, setting: PrecisionSetting) -> None:
        """Convert images, state and optimizer moments to the setting's current format."""


def convergence_value(losses: list[float]) -> float:
    """ANTs' convergence value of a window of losses: minus the slope of the normalised profile."""
    count = len(losses)
    total = sum(abs(value) for value in losses)
    if total == 0.0 or count < 2:
        return 0.0
    profile = [value / total for value in losses]
    positions = [index / (count - 1) for index in range(count)]
    mean_position = sum(positions) / count
    mean_profile = sum(profile) / count
    numerator = sum((p - mean_position) * (v - mean_profile) for p, v in zip(positions, profile, strict=True))
    denominator = sum((p - mean_position) ** 2 for p in positions)
    return -numerator / denominator


@dataclass
class ConvergenceMonitor:
    """ANTs' window convergence test on the loss curve of one level."""

    window: int = 10
    threshold: float = 1e-6
    losses: list[float] = field(default_factory=list)

    def converged(self, loss: float) -> bool:
        """Record a loss; True once a full window has a convergence value below the threshold."""
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return False
        return convergence_value(self.losses[-self.window :]) < self.threshold


class ScaledGradientDescent:
    """Rigid/affine optimizer: regular-step gradient descent with physical-shift parameter scales.

    Each parameter has a scale: how many mm the farthest voxel moves per unit of it (1 for a
    translation, the image radius for an angle or a matrix entry), as ANTs' scales estimator
    computes. The gradient is divided by the squared scales, and each step moves the farthest voxel
    by the current step length, which starts at `max_shift` mm (the stage's learning rate in voxels)
    and is multiplied by `relaxation` whenever a step points against the one before it (the optimum
    was stepped over), as ITK's RegularStepGradientDescentOptimizer does. The convergence test then
    stops the level once the shrinking steps no longer change the loss.

    ANTs keeps the rate of its first step instead. That rate oscillated around the optimum of a
    noisy level (affine at the coarsest level samples 126 voxels) until the convergence test
    happened to stop it, and where it stopped depended on rounding: fp32 and fp64 ended 1-3 % apart.
    With the shrinking step they agree to about 1e-5 at every rigid and affine level. Keeping ANTs'
    rate and only relaxing it was tried too: the steps then shrank with the gradient as well, and
    the levels took 1.6x as many iterations.
    """

    def __init__(self, scales: torch.Tensor, *, max_shift: float, relaxation: float) -> None:
        if not 0.0 < relaxation <= 1.0:
            raise ValueError(f"relaxation: must be in (0, 1], got {relaxation}")
        self.scales = scales
        self.step_length = max_shift
        self.relaxation = relaxation
        # the last step's move per parameter (float64, NumPy: its sign test is a 6- or 12-term dot)
        self.previous_shift: np.ndarray | None = None
        # `_numpy_step`'s scales by dtype, as NumPy arrays
        self._numpy_scales: dict[torch.dtype, np.ndarray] = {}

    def step(self, parameters: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The parameters after one scaled gradient step of the current length."""
        if (gradient.device.type == "cpu" and parameters.dtype == gradient.dtype
                and gradient.dtype in (torch.float32, torch.float64) and _get_current_dispatch_mode() is None):
            return self._numpy_step(parameters, gradient)
        scales = self.scales.to(device=gradient.device, dtype=gradient.dtype)
        direction = gradient / (scales * scales)
        # each parameter's move of the farthest voxel, in mm per unit step
        physical = direction * scales
        shift = float(physical.abs().max())
        if not shift > 0:
            return parameters
        self._relax(physical.detach().to(torch.float64).cpu().numpy())
        return parameters - (self.step_length / shift) * direction

    def _relax(self, moved: np.ndarray) -> None:
        """Shorten the step where this move points against the last one; keep this move."""
        if self.previous_shift is not None and float(moved @ self.previous_shift) < 0.0:
            self.step_length *= self.relaxation
        self.previous_shift = moved

    def _numpy_step(self, parameters: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """`step` on CPU float32/float64 vectors as NumPy operations in their dtype: the same
        arithmetic, at a microsecond an operation where each of torch's took several (a rigid level
        has six parameters)."""
        values = gradient.detach().numpy()
        scales = self._numpy_scales.get(gradient.dtype)
        if scales is None:
            scales = self._numpy_scales[gradient.dtype] = self.scales.to(gradient.dtype).cpu().numpy()
        direction = values / (scales * scales)
        physical = direction * scales
        shift = float(np.abs(physical).max())
        if not shift > 0:
            return parameters
        self._relax(physical.astype(np.float64))
        length = values.dtype.type(self.step_length / shift)
        return torch.from_numpy(parameters.detach().numpy() - length * direction)

    def cast(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The scales to the new format (the step length is a Python float, the last move float64)."""
        self.scales = convert(self.scales)
        self._numpy_scales = {}


def optimize_level(
    problem: LevelProblem,
    *,
    iterations: int,
    monitor: ConvergenceMonitor,
    setting: PrecisionSetting,
    stage: str,
    level: int,
    trace: list[dict[str, Any]],
) -> float:
    """Iterate one level until the iteration limit or convergence; return the last loss."""
    last_loss = math.nan
    for iteration in range(iterations):
        start = time.perf_counter()
        running_format = setting.format
        with setting.context():
            loss, gradients = problem.evaluate()
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise RegistrationDiverged(stage=stage, level=level, iteration=iteration)
        with setting.context():
            problem.step(gradients)
        # the controller reads every gradient value anyway: a NaN or infinite one makes their
        # squared norm (float64) non-finite, and the iteration diverged (its step is dropped with
        # the stage: a step skips a NaN direction, and the outputs use the stages before)
        observation = setting.observe(problem.state(), gradients)
        if not observation["gradients_finite"]:
            raise RegistrationDiverged(stage=stage, level=level, iteration=iteration)
        if observation["changed"]:
            problem.cast(setting)
        seconds = time.perf_counter() - start
        trace.append(
            {
                "stage": stage,
                "level": level,
                "iteration": iteration,
                "loss": loss_value,
                "pmin": observation["pmin"],
                "pmin_smoothed": observation["pmin_smoothed"],
                "format": running_format,
                "seconds": seconds,
            }
        )
        last_loss = loss_value
        if monitor.converged(loss_value):
            break
    return last_loss
