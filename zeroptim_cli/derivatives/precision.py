"""Float64 kept float64 inside a model's own code.

Models written for half precision convert on purpose: transformers' Llama computes RMSNorm with
``hidden_states.to(torch.float32)`` and its rotary embedding with ``.float()``, its losses call
``logits.float()``, other code writes ``.type(torch.FloatTensor)``, ``.to(other_tensor)``, ``.type_as(t)``
or makes constants with ``torch.tensor(…)`` in the default float32. Under ``--dtype float64`` each is a
silent *down*cast, which limits g and HΔ to float32's precision (seen for a tiny Llama: gᵀΔ off by
2·10⁻⁷ relative, and forward-over-reverse apart from double backward by 3·10⁻⁸).

While a float64 analysis runs, a torch function mode does two things, so that the computation is the
model's, in the dtype asked for:

1. a conversion to a lower floating precision (float32, bfloat16, float16; complex64) is asked for the wide
   one instead, before it runs, so that nothing is rounded: ``.float()``, ``.half()``, ``.bfloat16()``,
   ``.to(dtype)``, ``.to(other_tensor)``, ``.type(torch.float32 | "torch.FloatTensor" | torch.FloatTensor)``,
   ``.type_as(other_tensor)``, any ``dtype=`` argument;
2. a factory given no dtype that made its tensor in the default float32 (``torch.tensor([0.1])``,
   ``torch.arange(0., 1., 0.1)``, ``torch.full``) is asked again for float64, so that its values are those
   of the numbers written, not their float32 roundings;
3. any other tensor a call returns in a lower precision comes back widened. A tensor the call was given
   and returns as it is (an in-place op) is left alone, so aliasing stays as the model's code expects.

Other dtypes than float64 are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

#: lower precisions and what they become
_WIDER = {torch.float32: torch.float64, torch.bfloat16: torch.float64, torch.float16: torch.float64,
          torch.complex64: torch.complex128}


_NARROWING = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)
#: factories whose values depend on the dtype they are made in
_FACTORIES = (torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.full, torch.arange, torch.linspace,
              torch.logspace, torch.Tensor.new_tensor, torch.Tensor.new_full)


_WIDE_TYPE = {"FloatTensor": "DoubleTensor", "HalfTensor": "DoubleTensor", "BFloat16Tensor": "DoubleTensor"}


def _wide(kind: Any) -> Any:
    """What is asked for instead of ``kind``: a dtype, a tensor type (``torch.cuda.HalfTensor``) or its name
    (``"torch.FloatTensor"``) of a lower precision becomes the wide one on the same device; others stay."""
    if isinstance(kind, torch.dtype):
        return _WIDER.get(kind, kind)
    if isinstance(kind, str) and kind.startswith("torch."):
        head, _, name = kind.rpartition(".")
        return f"{head}.{_WIDE_TYPE.get(name, name)}"
    if isinstance(kind, type) and kind.__name__ in _WIDE_TYPE and kind.__module__ in ("torch", "torch.cuda"):
        return getattr(torch if kind.__module__ == "torch" else torch.cuda, _WIDE_TYPE[kind.__name__])
    return kind


def _widened_request(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """(func, args, kwargs) with every request for a lower precision turned into one for the wide dtype."""
    if func in _NARROWING:
        return torch.Tensor.to, (args[0], torch.float64), {}
    if func is torch.Tensor.type_as:
        return torch.Tensor.to, (args[0], _wide(args[1].dtype)), {}
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": _wide(kwargs["dtype"])}
    if func is torch.Tensor.type and args[1:]:
        args = (args[0], _wide(args[1]), *args[2:])
    elif func is torch.Tensor.to and args[1:]:
        if isinstance(args[1], torch.Tensor):  # .to(other, non_blocking, copy) = .to(other.device, other.dtype, …)
            args = (args[0], args[1].device, args[1].dtype, *args[2:])
        args = tuple(_wide(a) for a in args)
    return func, args, kwargs


class _NoLowerPrecision(TorchFunctionMode):
    """No lower floating precision than float64 in or out of a torch call (module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        func, args, kwargs = _widened_request(func, args, dict(kwargs or {}))
        out = func(*args, **kwargs)
        if func in _FACTORIES and kwargs.get("dtype") is None and isinstance(out, torch.Tensor) and out.dtype in _WIDER:
            out = func(*args, **{**kwargs, "dtype": _WIDER[out.dtype]})
        given = {id(a) for a in args if isinstance(a, torch.Tensor)}

        def widen(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dtype in _WIDER and id(t) not in given:
                return t.to(_WIDER[t.dtype])
            return t

        return tree_map(widen, out)


@contextlib.contextmanager
def computed_in(dtype: torch.dtype) -> Iterator[None]:
    """For float64: no lower floating precision anywhere in the block (module docstring); for any other dtype,
    nothing."""
    with _NoLowerPrecision() if dtype == torch.float64 else contextlib.nullcontext():
        yield
