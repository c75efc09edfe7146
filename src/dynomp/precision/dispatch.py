"""Run any PyTorch code in an emulated format, as Verificarlo's VPREC backend does for C/C++.

`VirtualPrecision` is a TorchDispatchMode: every aten op runs in its usual dtype (fp32 or fp64) and
its floating outputs are rounded to the chosen format with `round_to`. Ops that only create views
are left alone (their values are those of their base), and in-place ops are rounded in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
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
