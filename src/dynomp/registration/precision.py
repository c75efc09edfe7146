"""The precision arms of the engine: a fixed format, or DynoMP's per-iteration choice.

`fp64` and `fp32` run natively everywhere. `bf16` and `fp16` run natively where the device computes
in them (CUDA), or where `precision.native_formats` names them (on a CPU: the code a GPU runs, in
16-bit tensors), and are emulated elsewhere: the state is held in fp32 rounded to the format, and
every operation of the loss and its gradient runs under `VirtualPrecision`, which rounds each
result to the format. `dynomp` asks a `PrecisionController` at every iteration, from the stage's
parameters (rigid, affine) or fields (SyN) and their gradients, which format the next iteration
needs, and casts images, state and optimizer moments when the answer changes.

Fixed arms observe with a one-format controller too, so every trace carries p_min.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from dynomp.precision.controller import PrecisionController
from dynomp.precision.dispatch import VirtualPrecision
from dynomp.precision.formats import container_dtype, get_format, native_formats
from dynomp.precision.rounding import round_to
from dynomp.registration.config import PrecisionConfig

# a native step's context: nothing to enter (reentrant, so one instance serves every step)
_NO_CONTEXT = contextlib.nullcontext()

FIXED_ARMS = ("fp64", "fp32", "bf16", "fp16")
ENGINE_ARMS = (*FIXED_ARMS, "dynomp")
ANTS_ARMS = ("ants-fp64", "ants-fp32")
ARMS = (*ENGINE_ARMS, *ANTS_ARMS)


def check_arm(arm: str) -> str:
    """The arm name, or a ValueError listing the known arms."""
    if arm not in ARMS:
        raise ValueError(f"--arm: unknown arm {arm!r} (known: {', '.join(ARMS)})")
    return arm


class PrecisionSetting:
    """The current format of an engine arm, how to cast to it and how to compute in it."""

    def __init__(self, arm: str, *, device: str | torch.device, config: PrecisionConfig) -> None:
        if arm not in ENGINE_ARMS:
            raise ValueError(f"arm: {arm!r} is not an engine arm (known: {', '.join(ENGINE_ARMS)})")
        self.arm = arm
        self.device = torch.device(device)
        self.config = config
        self.native = config.native_formats or native_formats(self.device)
        self.adaptive = arm == "dynomp"
        if self.adaptive:
            self.format = self._new_controller(config.initial_format).format
        else:
            self.format = arm
        self.controller = self._new_controller(self.format)
        self.working_magnitude: float | None = None

    def _new_controller(self, initial_format: str) -> PrecisionController:
        if self.adaptive:
            return PrecisionController(
                self.config.formats,
                self.config.window,
                self.config.execution,
                device=self.device,
                native_formats=self.native,
                initial_format=initial_format,
            )
        return PrecisionController(
            [self.arm], self.config.window, "virtual", device=self.device,
            native_formats=self.native, initial_format=self.arm,
        )

    def start_level(self, *, working_magnitude: float | None = None) -> None:
        """A fresh controller window for a new level or stage (the state changes shape there).

        `working_magnitude`: the largest value the level's loss computes (see
        `dynomp.registration.metrics.largest_intermediate`); formats whose range cannot hold it are
        not chosen.
        """
        self.controller = self._new_controller(self.format)
        self.working_magnitude = working_magnitude

    @property
    def format(self) -> str:
        """The current format's name."""
        return self._format

    @format.setter
    def format(self, name: str) -> None:
        # the dtype and the emulation flag, looked up once per change (the loop asks at every step)
        self._format = name
        self._dtype = container_dtype(name, self.native)
        self._virtual = get_format(name).dtype != self._dtype

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype that holds the current format on this device."""
        return self._dtype

    @property
    def virtual(self) -> bool:
        """True when the current format is emulated rather than computed in natively."""
        return self._virtual

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in the current format: its native dtype, or fp32 rounded to the format."""
        converted = tensor.detach().to(self._dtype)
        if self._virtual:
            converted = round_to(converted, self.format)
        return converted

    def context(self) -> contextlib.AbstractContextManager:
        """Where the current format is emulated, round every operation's result to it."""
        if self._virtual:
            return VirtualPrecision(self._format)
        return _NO_CONTEXT

    def observe(self, parameters: list[torch.Tensor], gradients: list[torch.Tensor]) -> dict[str, Any]:
        """Feed one iteration to the controller; say whether the format changed, and p_min."""
        chosen = self.controller.observe(
            [p.detach() for p in parameters], [g.detach() for g in gradients],
            max_abs=self.working_magnitude,
        )
        row = self.controller.trace[-1]
        changed = False
        if self.adaptive and chosen != self.format:
            self.format = chosen
            changed = True
        return {
            "changed": changed,
            "pmin": float(row["pmin"]),
            "pmin_smoothed": float(row["pmin_smoothed"]),
            # float64 squares: not finite exactly where a gradient is NaN or infinite (or above
            # 1e154 in magnitude, which no converging registration computes)
            "gradients_finite": math.isfinite(row["grad_norm"]),
        }


def seconds_by_format(trace: list[dict[str, Any]]) -> dict[str, float]:
    """Total iteration time spent in each format, from a trace."""
    totals: dict[str, float] = {}
    for row in trace:
        seconds = row["seconds"]
        if isinstance(seconds, float) and math.isfinite(seconds):
            totals[row["format"]] = totals.get(row["format"], 0.0) + seconds
    return totals
