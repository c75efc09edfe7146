"""Precision strategies for a training step: how the forward pass, the backward pass and the update
run, and what is cast when.

What each arm does, on CPU and on CUDA (torch 2.13; every arm runs on both):

- ``fp32``: parameters, data, forward, backward and Adam state in float32.
- ``amp``: parameters and optimizer state stay float32; the forward runs under
  ``torch.autocast(device, float16)``, so convolutions and matmuls compute in float16 (torch
  2.13's CPU autocast does so too, through slow CPU float16 kernels; CUDA uses tensor cores).
  The loss is computed in float32 and multiplied by a ``torch.amp.GradScaler``: scale, backward,
  ``unscale_`` before clipping (so the clipping threshold applies to true gradients), step (skipped
  when a gradient is inf/NaN), update. The scaler state goes into checkpoints; the scale is logged.
- ``amp-bf16``: as ``amp`` with bfloat16 and no scaler (bf16 has float32's exponent range).
- ``bf16`` / ``fp16``: the whole model, its optimizer state and the data are cast; every op runs in
  that dtype (native kernels on both devices: torch 2.13 has float16 and bfloat16 CPU kernels for
  every op VoxelMorph uses, though most are slower than float32 there). Losses are still reduced in
  float32, so that the arms differ in the network's arithmetic only (in emulated formats too:
  `dynomp.precision.dispatch.widened_call`).
- ``dynomp``: a `PrecisionController` observes every step and picks the next step's format. In
  ``native`` execution a format is rounded up to one the device computes in (CPU: fp32 and fp64,
  unless ``native_formats`` adds fp16/bf16; CUDA: also fp16 and bf16) and the model, the optimizer
  state (or the fp32 master weights with ``master_weights``), the data and VoxelMorph's cached
  sampling grid are cast when it changes. In ``virtual`` execution the state stays float32 and every
  op of the forward and backward passes is rounded to the exact chosen format (`VirtualPrecision`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from dynomp.learning.config import TrainingConfig
from dynomp.precision.controller import PrecisionController

STRATEGIES = ("fp32", "amp", "amp-bf16", "bf16", "fp16", "dynomp")
_CAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_DTYPES = {"amp": torch.float16, "amp-bf16": torch.bfloat16}


def cast_cached_grids(model: torch.nn.Module, cast) -> int:
    """Apply `cast` to every cached sampling grid; return how many were cast.

    VoxelMorph's SpatialTransformer keeps its grid as a plain attribute (not a buffer), so
    ``module.to(dtype)`` leaves it in the old dtype; it is rebuilt only when the shape changes.
    """
    count = 0
    for module in model.modules():
        grid = getattr(module, "meshgrid", None)
        if torch.is_tensor(grid):
            module.meshgrid = cast(grid)
            count += 1
    return count


class Strategy:
    """The fp32 / cast / autocast arms; `DynompStrategy` adds the controller."""

    def __init__(self, name: str, config: TrainingConfig) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"arm: unknown arm {name!r} (known: {', '.join(STRATEGIES)})")
        self.name = name
        self.config = config
        self.device = torch.device(config.device)
        self.scaler: torch.amp.GradScaler | None = None
        if name == "amp":
            self.scaler = torch.amp.GradScaler(
                self.device.type,
                init_scale=config.initial_loss_scale,
                growth_interval=config.loss_scale_growth_interval,
            )

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The dtype the model's parameters are stored in."""
        return _CAST_DTYPES.get(self.name, torch.float32)

    @property
    def format(self) -> str:
        """The format the network computes in this step."""
        return {"amp": "fp16", "amp-bf16": "bf16"}.get(self.name, self.name)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Cast the freshly built model (before any optimizer state exists)."""
        model.to(self.parameter_dtype)

    def cast_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """A data tensor in the dtype the model takes."""
        return tensor.to(self.device, self.parameter_dtype)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Autocast for the amp arms, nothing for the others."""
        if self.name in _AUTOCAST_DTYPES:
            return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.name])
        return contextlib.nullcontext()

    def backward_context(self) -> contextlib.AbstractContextManager:
        """Nothing: the backward pass follows the forward's dtypes (autocast records them)."""
        return contextlib.nullcontext()

    def backward_and_step(
        self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> float:
        """Backward, clip, update; return the (unscaled) gradient norm before clipping."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        clip = self.config.clip_gradient_norm or math.inf
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            return float(norm)
        with self.backward_context():
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
        self.optimizer_step(optimizer)
        return float(norm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step()."""
        optimizer.step()

    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to adapt for a fixed-precision arm."""

    def record(self) -> dict[str, Any]:
        """This step's precision columns: p_min, smoothed p_min, format, loss scale."""
        return {
            "pmin": math.nan,
            "pmin_smoothed": math.nan,
            "format": self.format,
            "loss_scale": float(self.scaler.get_scale()) if self.scaler is not None else math.nan,
        }

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What a checkpoint needs to resume this arm exactly."""
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(
        self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Restore `state_dict` (call before loading the model's and optimizer's own state)."""
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


class DynompStrategy(Strategy):
    """The DynoMP arm: the controller picks each step's format from the estimated p_min."""

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__("dynomp", config)
        self.controller = PrecisionController(
            config.formats,
            config.window,
            config.execution,
            device=self.device,
            native_formats=config.native_formats,
            initial_format=config.initial_format,
        )
        self.current_format = self.controller.format
        self.format_changes = 0

    @property
    def parameter_dtype(self) -> torch.dtype:
        """The dtype that stores the current format."""
        return self.controller.dtype(self.current_format)

    @property
    def format(self) -> str:
        """The format the state is in now."""
        return self.current_format

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Cast the model to the initial format (and attach master weights)."""
        self._apply(model, optimizer, self.current_format)

    def _apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fmt: str) -> None:
        self.controller.apply(model, optimizer, fmt, master_weights=self.config.master_weights)
        cast_cached_grids(model, lambda grid: self.controller.cast(grid, fmt))
        self.current_format = fmt

    def cast_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """Data in the current format (rounded to it in virtual execution)."""
        return self.controller.cast(tensor.to(self.device), self.current_format)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Emulation of a virtual format; nothing for a native one."""
        return self.controller.context(self.current_format)

    def backward_context(self) -> contextlib.AbstractContextManager:
        """Emulation of a virtual format covers the backward pass too."""
        return self.controller.context(self.current_format)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The update through the master weights, when attached."""
        self.controller.optimizer_step(optimizer)

    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Observe the step; cast everything when the next step's format differs."""
        parameters = [p for p in model.parameters() if p.grad is not None]
        chosen = self.controller.observe(parameters, [p.grad for p in parameters])
        self._last = self.controller.trace[-1]
        if chosen != self.current_format:
            self._apply(model, optimizer, chosen)
            self.format_changes += 1

    def record(self) -> dict[str, Any]:
        """p_min and its smoothed value as estimated after this step."""
        last = getattr(self, "_last", None) or {}
        return {
            "pmin": float(last.get("pmin", math.nan)),
            "pmin_smoothed": float(last.get("pmin_smoothed", math.nan)),
            "format": self.current_format,
            "loss_scale": math.nan,
        }

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Controller state, current format and (with master weights) the fp32 masters."""
        return {
            "controller": self.controller.state_dict(),
            "current_format": self.current_format,
            "format_changes": self.format_changes,
            "optimizer_parameters": [
                p.detach().clone() for group in optimizer.param_groups for p in group["params"]
            ]
            if self.config.master_weights
            else None,
        }

    def load_state_dict(
        self, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Restore the controller, cast to the saved format and restore the master weights."""
        self.controller.load_state_dict(state["controller"])
        self.format_changes = int(state["format_changes"])
        self._apply(model, optimizer, state["current_format"])
        if state["optimizer_parameters"] is not None:
            targets = [p for group in optimizer.param_groups for p in group["params"]]
            with torch.no_grad():
                for target, saved in zip(targets, state["optimizer_parameters"], strict=True):
                    target.copy_(saved)
        trace = self.controller.trace
        self._last = trace[-1] if trace else None


def make_strategy(config: TrainingConfig) -> Strategy:
    """The strategy object of `config.arm`."""
    if config.arm == "dynomp":
        return DynompStrategy(config)
    return Strategy(config.arm, config)
