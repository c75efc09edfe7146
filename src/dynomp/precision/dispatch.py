"""Run any PyTorch code in an emulated format, as Verificarlo's VPREC backend does for C/C++.

`VirtualPrecision` is a TorchDispatchMode: every aten op runs in its usual dtype (fp32 or fp64) and
its floating outputs are rounded to the chosen format with `round_to`. Ops that only create views
are left alone (their values are those of their base), and in-place ops are rounded in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    _get_current_dispatch_mode_stack,
)
from torch.utils._pytree import tree_map

from dynomp.precision.formats import FloatFormat, get_format
from dynomp.precision.rounding import ROUNDING_MODES, round_to

_ROUNDED_DTYPES = (torch.float32, torch.float64)
# ops whose outputs are uninitialised memory or pure metadata: rounding them is wasted work
_SKIPPED_OPS = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.lift_fresh.default,
}


_HALF_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def single_precision_accumulation() -> Iterator[None]:
    """Run the enclosed operations unrounded: an active `VirtualPrecision` is suspended inside.

    For the few reductions a low-precision step keeps in at least fp32, as GPUs do when they
    accumulate 16-bit products in fp32: a metric's sums over thousands of voxels, its histogram,
    the loss value. Pair it with `widen`, which gives natively held 16-bit tensors the float32
    dtype. Autograd still records the operations; their backward runs in whatever mode is active
    when the gradient is taken.
    """
    if _emulating():
        with _disable_current_modes():
            yield
    else:
        yield


def _emulating() -> bool:
    return any(getattr(mode, "emulates_precision", False) for mode in _get_current_dispatch_mode_stack())


def narrow(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor`, computed in at least fp32, back in the step's format: converted to `dtype`, and
    rounded to the emulated format where a `VirtualPrecision` is active, as the conversion rounds
    a natively 16-bit tensor. (`tensor.to(dtype)` alone is no operation when the dtypes agree, and
    an emulated step would go on with the unrounded values.) Call it outside
    `single_precision_accumulation`, which suspends the rounding."""
    if tensor.dtype != dtype:
        return tensor.to(dtype)
    if _emulating():
        return tensor.clone()  # an aten op: the active mode rounds its output
    return tensor


def widened_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16 and bf16; any other dtype (float32, float64) unchanged."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def widen(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as float32 where it is held in fp16 or bf16; unchanged otherwise (float32, float64)."""
    return tensor.to(widened_dtype(tensor.dtype))


def in_single_precision(function: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                        rounded: Sequence[bool] | None = None) -> torch.Tensor:
    """`function(*tensors)` computed in at least fp32, its backward too.

    `single_precision_accumulation` covers a forward pass only: autograd runs the backward later,
    under the caller's mode, where a 16-bit format can turn a division by a small sum into inf.
    Here both passes run unrounded on widened inputs, and the gradients go back in the inputs'
    dtypes (`narrow`), each rounded to an emulated format unless `rounded` (a flag per tensor)
    says otherwise: for an input that is at least fp32 natively too (sample points, master
    parameters), which an emulated run holds in the same float32 dtype as its 16-bit tensors.
    """
    flags = tuple(True for _ in tensors) if rounded is None else tuple(bool(flag) for flag in rounded)
    if len(flags) != len(tensors):
        raise ValueError(f"rounded: {len(flags)} flags for {len(tensors)} tensors")
    return _SinglePrecision.apply(function, flags, *tensors)


def widened_call(function: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                 rounded: Sequence[bool] | None = None) -> torch.Tensor:
    """`function` on the tensors widened to at least fp32, as a natively 16-bit step runs a region
    whose inputs it widens: forward and backward in fp32, the gradients back in the inputs' dtypes.

    Natively the dtypes do this by themselves (autograd takes each gradient through the widening
    conversion, which rounds it once). Under an emulated format every tensor is already fp32, and
    the backward would run under the mode, rounded op by op: there `in_single_precision` runs
    both passes unrounded and rounds the gradients once (those of the inputs `rounded` flags). The
    output stays widened (`narrow` it).
    """
    if _emulating():
        return in_single_precision(function, *tensors, rounded=rounded)
    return function(*(widen(tensor) for tensor in tensors))


class _SinglePrecision(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, rounded, *tensors):
        with single_precision_accumulation(), torch.enable_grad():
            inputs = [widen(t.detach()).requires_grad_(t.requires_grad) for t in tensors]
            output = function(*inputs)
        ctx.inputs, ctx.output, ctx.rounded = inputs, output, rounded
        ctx.dtypes = [t.dtype for t in tensors]
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        wanted = [index for index, tensor in enumerate(ctx.inputs) if tensor.requires_grad]
        gradients = [None] * len(ctx.inputs)
        if wanted:
            with single_precision_accumulation(), torch.enable_grad():
                # the vector-Jacobian product as the gradient of <output, grad>, the same values:
                # autograd.grad given grad_outputs imports sympy on its first call (about 1 s)
                weighted = (ctx.output * widen(grad).to(ctx.output.dtype)).sum()
                found = torch.autograd.grad(weighted, [ctx.inputs[i] for i in wanted],
                                            allow_unused=True)
            for index, value in zip(wanted, found, strict=True):
                if value is not None:
                    gradients[index] = (narrow(value, ctx.dtypes[index]) if ctx.rounded[index]
                                        else value.to(ctx.dtypes[index]))
        ctx.inputs = ctx.output = None
        return (None, None, *gradients)


class VirtualPrecision(TorchDispatchMode):
    """Round the float32/float64 output of every aten op to `fmt` while the context is active.

    Tensors of other dtypes (integers, fp16/bf16 storage) pass through unchanged.
    """

    emulates_precision = True  # round_to checks this to keep its own arithmetic exact

    def __init__(
        self,
        fmt: str | FloatFormat,
        rounding: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.format = get_format(fmt, argument="fmt")
        if rounding not in ROUNDING_MODES:
            raise ValueError(
                f"rounding: unknown mode {rounding!r} (known: {', '.join(ROUNDING_MODES)})"
            )
        self.rounding = rounding
        self.generator = generator

    def _round(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype in _ROUNDED_DTYPES:
            return round_to(value, self.format, self.rounding, self.generator)
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SKIPPED_OPS or func.is_view:
            return out
        schema = func._schema
        if schema.is_mutable:
            # in-place and out= variants: round every tensor the op wrote to, in place
            for argument, value in zip(schema.arguments, args, strict=False):
                self._round_written(argument, value)
            for argument in schema.arguments:
                if argument.name in kwargs:
                    self._round_written(argument, kwargs[argument.name])
            return out
        return tree_map(self._round, out)

    def _round_written(self, argument, value) -> None:
        if argument.alias_info is None or not argument.alias_info.is_write:
            return
        tensors = value if isinstance(value, list | tuple) else [value]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.dtype in _ROUNDED_DTYPES:
                tensor.copy_(round_to(tensor, self.format, self.rounding, self.generator))
