"""Float64 kept float64 inside a model's own code.

Models written for half precision upcast on purpose: transformers' Llama computes RMSNorm with
``hidden_states.to(torch.float32)`` and its rotary embedding with ``.float()``, and its losses call
``logits.float()``. Under ``--dtype float64`` each such upcast is a silent *down*cast, which limits g and
HΔ to float32's precision (seen for a tiny Llama: gᵀΔ off by 2·10⁻⁷ relative, and forward-over-reverse
apart from double backward by 3·10⁻⁸). While a float64 analysis runs, a torch function mode turns every
conversion to float32 (``.float()``, ``.to(torch.float32)``, ``.type(torch.float32)``, ``dtype=torch.float32``) into one to float64,
so the computation is the model's, in the dtype asked for. Other dtypes are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_FLOAT32_NAMES = (torch.float32, "torch.float32", "torch.FloatTensor")


class _NoFloat32(TorchFunctionMode):
    """Every conversion to float32 becomes one to float64."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float or (func is torch.Tensor.type and args[1:] and args[1] in _FLOAT32_NAMES):
            return args[0].to(torch.float64)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def computed_in(dtype: torch.dtype) -> Iterator[None]:
    """For float64: no float32 anywhere in the block (module docstring); for any other dtype, nothing."""
    with _NoFloat32() if dtype == torch.float64 else contextlib.nullcontext():
        yield
