"""The DynoMP controller: observe a step, estimate p_min, smooth it, pick the next step's format.

Typical use in a training loop::

    controller = PrecisionController(["bf16", "fp16", "fp32"], window=5, device="cuda")
    for batch in loader:
        with controller.context():
            loss = model(controller.cast(batch)).mean()
        loss.backward()
        controller.optimizer_step(optimizer)
        params = [p for p in model.parameters()]
        fmt = controller.observe(params, [p.grad for p in params])
        controller.apply(model, optimizer, fmt)
        optimizer.zero_grad()

All state (window, previous step, trace) belongs to the instance; two controllers never share a
window (the original DynoMP code kept it in a class attribute by accident).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dynomp.precision.dispatch import VirtualPrecision, widened_dtype
from dynomp.precision.estimator import (
    as_tensor_list,
    check_same_shapes,
    pmin_from_norms,
    secant_lipschitz,
    step_statistics,
)
from dynomp.precision.formats import (
    container_dtype,
    get_format,
    native_formats as device_native_formats,
    nearest_native,
    validate_formats,
)
from dynomp.precision.policy import choose_format
from dynomp.precision.rounding import ROUNDING_MODES, round_to

EXECUTION_MODES = ("native", "virtual")
DEFAULT_FORMATS = ("bf16", "fp16", "fp32", "fp64")
TRACE_COLUMNS = (
    "step",
    "pmin",
    "pmin_smoothed",
    "lipschitz",
    "grad_norm",
    "param_norm",
    "max_abs",
    "chosen_format",
    "format",
)


def _copies(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if tensors is None else [t.detach().clone() for t in tensors]


class PrecisionController:
    """Chooses, at every step, the cheapest format whose precision the step needs.

    Parameters
    ----------
    formats
        The allowed set P of format names.
    window
        Number of recent p_min estimates averaged (N in the paper).
    execution
        ``native``: a chosen format is rounded up to the nearest format the device computes in, for
        real time and memory savings. ``virtual``: the exact chosen format is emulated by rounding.
    device
        Device whose native formats apply (``cpu``: fp64, fp32; ``cuda``: also fp16, bf16).
    native_formats
        Override the device's native formats.
    initial_format
        The format of the first steps, before the secant has two points.
    check_range
        Skip formats whose largest finite value cannot hold the parameters and gradients.
    rounding
        Rounding of virtual formats: ``nearest`` or ``stochastic``.
    """

    def __init__(
        self,
        formats: Iterable[str] = DEFAULT_FORMATS,
        window: int = 5,
        execution: str = "native",
        *,
        device: str | torch.device = "cpu",
        native_formats: Iterable[str] | None = None,
        initial_format: str = "fp32",
        check_range: bool = True,
        rounding: str = "nearest",
    ) -> None:
        if isinstance(formats, str):
            raise ValueError(f"formats: expected a collection of format names, got {formats!r}")
        self.formats = validate_formats(formats, argument="formats")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        if execution not in EXECUTION_MODES:
            raise ValueError(
                f"execution: unknown mode {execution!r} (known: {', '.join(EXECUTION_MODES)})"
            )
        if rounding not in ROUNDING_MODES:
            raise ValueError(
                f"rounding: unknown mode {rounding!r} (known: {', '.join(ROUNDING_MODES)})"
            )
        self.window = window
        self.execution = execution
        self.device = torch.device(device)
        self.native = (
            validate_formats(native_formats, argument="native_formats")
            if native_formats is not None
            else device_native_formats(self.device)
        )
        self.check_range = check_range
        self.rounding = rounding
        self._native_for: dict[str, str] = {}  # a format -> the native format that runs it
        get_format(initial_format, argument="initial_format")
        self.initial_format = self._executable(initial_format)
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all history: the window, the previous step, the trace and the current format."""
        self.step = 0
        self.format = self.initial_format
        self.lipschitz: float | None = None
        self.pmin_window: deque[float] = deque(maxlen=self.window)
        self.trace: list[dict[str, Any]] = []
        self._previous_parameters: list[torch.Tensor] | None = None
        self._previous_gradients: list[torch.Tensor] | None = None
        self._masters: dict[torch.nn.Parameter, torch.nn.Parameter] = {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (for checkpoints)."""
        return {
            "step": self.step,
            "format": self.format,
            "lipschitz": self.lipschitz,
            "pmin_window": list(self.pmin_window),
            "trace": [dict(row) for row in self.trace],
            # copies: the controller overwrites its own in place at the next step
            "previous_parameters": _copies(self._previous_parameters),
            "previous_gradients": _copies(self._previous_gradients),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.step = int(state["step"])
        self.format = get_format(state["format"], argument="state['format']").name
        self.lipschitz = state["lipschitz"]
        self.pmin_window = deque(state["pmin_window"], maxlen=self.window)
        self.trace = [dict(row) for row in state["trace"]]
        self._previous_parameters = _copies(state["previous_parameters"])
        self._previous_gradients = _copies(state["previous_gradients"])

    # -- the method ----------------------------------------------------------------------------
    def observe(
        self,
        parameters: torch.Tensor | Sequence[torch.Tensor],
        gradients: torch.Tensor | Sequence[torch.Tensor],
        *,
        max_abs: float | None = None,
    ) -> str:
        """Record one step (its parameters and gradients) and return the format for the next step.

        `max_abs`: the largest magnitude the step computes besides its state (a metric's sums, say),
        which the chosen format's range must hold as well as the parameters' and gradients'.
        """
        theta = as_tensor_list(parameters, "parameters")
        grad = as_tensor_list(gradients, "gradients")
        check_same_shapes(theta, grad, "parameters", "gradients")
        if self._previous_parameters is not None:
            try:
                check_same_shapes(theta, self._previous_parameters, "parameters", "previous step")
            except ValueError as error:
                raise ValueError(f"parameters: changed shape between steps ({error})") from None
        self.step += 1
        stats = step_statistics(
            theta,
            grad,
            self._previous_parameters,
            self._previous_gradients,
            with_max_abs=self.check_range,
            keep=True,  # the copies below are the controller's own: overwritten in the same pass
        )
        param_norm, grad_norm = stats["param_norm"], stats["grad_norm"]
        pmin = None
        if self._previous_parameters is not None:
            lipschitz = secant_lipschitz(stats["step_norm"], stats["grad_change_norm"], param_norm)
            if lipschitz is not None:
                self.lipschitz = lipschitz
            if self.lipschitz is not None:
                pmin = pmin_from_norms(self.lipschitz, param_norm, grad_norm)
        if pmin is not None:
            self.pmin_window.append(pmin)
        smoothed = sum(self.pmin_window) / len(self.pmin_window) if self.pmin_window else None
        largest = stats["max_abs"] if self.check_range else None
        if largest is not None and math.isnan(largest):
            largest = None  # a NaN state (a diverging run) says nothing about the range it needs
        if self.check_range and max_abs is not None and math.isfinite(max_abs):
            largest = max(largest or 0.0, float(max_abs))
        if smoothed is None:
            chosen = self.trace[-1]["chosen_format"] if self.trace else self.initial_format
        else:
            chosen = choose_format(smoothed, self.formats, max_abs=largest)
        self.format = self._executable(chosen)
        self.trace.append(
            {
                "step": self.step,
                "pmin": math.nan if pmin is None else pmin,
                "pmin_smoothed": math.nan if smoothed is None else smoothed,
                "lipschitz": math.nan if self.lipschitz is None else self.lipschitz,
                "grad_norm": grad_norm,
                "param_norm": param_norm,
                "max_abs": math.nan if largest is None else largest,
                "chosen_format": chosen,
                "format": self.format,
            }
        )
        if not stats["kept"]:
            self._previous_parameters = [t.detach().clone() for t in theta]
            self._previous_gradients = [t.detach().clone() for t in grad]
        return self.format

    def _executable(self, name: str) -> str:
        if self.execution == "native":
            executable = self._native_for.get(name)
            if executable is None:
                executable = self._native_for[name] = nearest_native(name, self.native)
            return executable
        return name

    # -- acting on the state ---------------------------------------------------------------------
    def dtype(self, fmt: str | None = None) -> torch.dtype:
        """The torch dtype that stores `fmt` (default: the current format) in this execution mode."""
        return container_dtype(fmt or self.format, self.native)

    def cast(self, tensor: torch.Tensor, fmt: str | None = None) -> torch.Tensor:
        """A floating tensor converted to `fmt` (default: current): native dtype, or rounded."""
        if not tensor.is_floating_point():
            return tensor
        fmt = fmt or self.format
        converted = tensor.to(self.dtype(fmt))
        if converted.dtype in (torch.float32, torch.float64):
            converted = round_to(converted, fmt, self.rounding)
        return converted

    def context(self, fmt: str | None = None) -> contextlib.AbstractContextManager:
        """VirtualPrecision for a virtual format; a no-op where the dtype is the format itself."""
        fmt = get_format(fmt or self.format)
        if fmt.dtype is not None and fmt.dtype == self.dtype(fmt.name):
            return contextlib.nullcontext()
        return VirtualPrecision(fmt, self.rounding)

    def apply(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        fmt: str | None = None,
        *,
        master_weights: bool = False,
    ) -> None:
        """Cast a module's parameters and buffers, and its optimizer's state, to `fmt`.

        With `master_weights`, the optimizer keeps fp32 (or fp64) copies of the parameters and its
        state in that precision; call `optimizer_step` instead of `optimizer.step()`.
        """
        fmt = get_format(fmt or self.format, argument="fmt").name
        self.format = fmt  # cast() and context() now follow the state's format
        dtype = self.dtype(fmt)
        if master_weights and optimizer is not None:
            self._attach_masters(module, optimizer, dtype)
        module.to(dtype)
        if dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    if tensor.is_floating_point():
                        tensor.copy_(round_to(tensor, fmt, self.rounding))
        if optimizer is not None and not self._masters:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        state[key] = self.cast(value, fmt)

    def _attach_masters(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype
    ) -> None:
        master_dtype = widened_dtype(dtype)
        if self._masters:
            for master in self._masters.values():
                if master.dtype != master_dtype and master_dtype == torch.float64:
                    master.data = master.data.to(master_dtype)
            return
        for parameter in module.parameters():
            master = torch.nn.Parameter(parameter.detach().to(master_dtype).clone())
            self._masters[parameter] = master
        lookup = {id(p): m for p, m in self._masters.items()}
        for group in optimizer.param_groups:
            group["params"] = [lookup.get(id(p), p) for p in group["params"]]
        optimizer.state = defaultdict(
            dict, {lookup.get(id(p), p): s for p, s in optimizer.state.items()}
        )

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), through the fp32 master weights when `apply` attached them."""
        if not self._masters:
            optimizer.step()
            if self.execution == "virtual":
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for parameter in group["params"]:
                            if parameter.dtype in (torch.float32, torch.float64):
                                parameter.copy_(round_to(parameter, self.format, self.rounding))
            return
        for parameter, master in self._masters.items():
            master.grad = None if parameter.grad is None else parameter.grad.to(master.dtype)
        optimizer.step()
        with torch.no_grad():
            for parameter, master in self._masters.items():
                parameter.copy_(self.cast(master, self.format).to(parameter.dtype))
