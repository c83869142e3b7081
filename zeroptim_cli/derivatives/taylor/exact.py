"""Products exact in α: f(w + Δ) reuses what Taylor mode computed of it.

A product of parameters with constants only — a first layer, ``x·Wᵀ + b`` with x the batch — is a polynomial
in α of degree at most two that Taylor mode holds whole: the parameters enter as w + αΔ exactly, so its series
y0 + y1·α + y2·α² is not truncated and at α = 1 it is the product at w + Δ, y(1) = y0 + y1 + y2. Evaluating
f(w_t1) after φ(0), φ'(0), φ''(0) on the same batch, the plain forward pass at w_t1 then needs no product of its
own there: ``Recorder`` notes y(1) of each such product during the Taylor pass, and ``Replay`` returns it for
the very same call in the forward pass at w + Δ (on a wide MLP, the first layer is a quarter of a forward's
multiply-adds; on a language model, whose first op is an embedding lookup, nothing is noted and nothing changes).

A call is the very same when it is the same op with the same non-tensor arguments, every α-dependent argument
is the same view of the same parameter laid out alike (in the Taylor pass a tensor whose c0 and c1 are that view
of w's and of Δ's entry, and c2 = 0; in the forward pass that view of w + Δ's entry, whose own shape and strides
are w's) and every constant argument holds, entry by entry, the numbers a copy taken when the product was noted
holds (the batch itself, or a constant computed again from it, such as ``2·x − 1``; a write into it since, even
through ``.data``, which no version counter sees, makes it another call). Copy and comparison read the input
twice, where the product reads it once per output feature.

Private torch API used here: ``torch.utils._python_dispatch.TorchDispatchMode`` (the replay, through ``dispatch_mode``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zeroptim_cli.derivatives.dispatch_mode import EagerDispatchMode
from zeroptim_cli.derivatives.taylor._core import coeffs, is_taylor

aten = torch.ops.aten

#: The products whose y(1) is noted: every one that the forward pass of a layer on its input runs.
PRODUCTS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                      aten.convolution.default})

#: Reuse only where the noted products hold at least this many multiply-adds: below, the replay's dispatch of
#: every op of the forward pass through Python costs more than the products save (measured: a 784-128-64-10 MLP
#: at batch 128, whose first layer is 12.8M, took 7 % longer with it).
REUSE_MIN_MACS = 2**24


def multiply_adds(func, args: tuple, out: Tensor) -> int:
    """The multiply-adds of a product in ``PRODUCTS``: each output entry sums over the shared dimension (a
    convolution's: input channels per group × kernel; the weight of a transposed one is laid out input first)."""
    if func is aten.convolution.default:
        weight, transposed, groups = coeffs(args[1])[0], args[6], args[8]
        return out.numel() * math.prod(weight.shape[2:]) * (weight.shape[0] // groups if transposed else weight.shape[1])
    first = args[1] if func in (aten.addmm.default, aten.baddbmm.default) else args[0]
    return out.numel() * coeffs(first)[0].shape[-1]


#: An argument's part of a call's key: ("constant", shape, strides, dtype) for a constant tensor (its numbers
#: are compared apart), ("parameter", ``_Locator``'s answer) for a view of a parameter, or a non-tensor argument
#: itself (a list as a tuple).
Part = tuple


class _Locator:
    """Which view of which named tensor of a dict a tensor is: (name, the named tensor's shape and strides, the
    view's offset within it, shape, strides and dtype)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._by_storage: dict[tuple, list[tuple[str, Tensor]]] = defaultdict(list)
        for name, t in tensors.items():
            self._by_storage[_storage(t)].append((name, t))

    def __call__(self, t: Tensor) -> tuple | None:
        for name, p in self._by_storage.get(_storage(t), ()):
            offset = t.storage_offset() - p.storage_offset()
            if 0 <= offset < max(p.numel(), 1) and t.dtype == p.dtype:
                return name, tuple(p.shape), p.stride(), offset, tuple(t.shape), t.stride(), t.dtype
        return None


def _storage(t: Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


@dataclass
class _Noted:
    """One noted product: copies of its constant arguments as they were, and its value at α = 1."""

    constants: list[Tensor]
    value: Tensor


def _parts(args: tuple, kwargs: dict, locate: _Locator,
           delta: _Locator | None = None) -> tuple[tuple, list[Tensor]] | None:
    """(the call's key, its constant tensors), or None where an argument is a list holding tensors or, in the
    Taylor pass (``delta``: where Δ's views are found), an α-dependent tensor that is not w + αΔ itself."""
    parts: list[Part] = []
    constants = []
    for a in args:
        if delta is not None and is_taylor(a):
            c0, c1, c2 = coeffs(a)
            at = locate(c0)
            if c2 is not None or c1 is None or at is None or delta(c1) != at:
                return None  # not w + αΔ itself: its series may be truncated
            parts.append(("parameter", *at))
        elif isinstance(a, Tensor):
            at = None if delta is not None else locate(a)
            if at is None:
                parts.append(("constant", tuple(a.shape), a.stride(), a.dtype))
                constants.append(a)
            else:
                parts.append(("parameter", *at))
        elif isinstance(a, (list, tuple)):
            if any(isinstance(b, Tensor) for b in a):
                return None
            parts.append(tuple(a))  # a convolution's stride, padding, …
        else:
            parts.append(a)
    extra = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(kwargs.items()))
    if any(isinstance(v, Tensor) or isinstance(v, tuple) and any(isinstance(u, Tensor) for u in v) for _, v in extra):
        return None
    return (*parts, *extra), constants


class Recorder:
    """Notes y(1) of every product of parameters with constants in one Taylor pass (``note``), for ``Replay``.

    ``w`` and ``delta`` are the tensors the parameters' Taylor tensors are made of (their c0 and c1)."""

    def __init__(self, w: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
        self._w, self._delta = _Locator(w), _Locator(delta)
        self.noted: dict[tuple, list[_Noted]] = defaultdict(list)
        self.macs = 0  # of the noted products

    @property
    def pays(self) -> bool:
        """Whether the noted products are worth a replay (``REUSE_MIN_MACS``)."""
        return self.macs >= REUSE_MIN_MACS

    def note(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Note ``out``'s value at α = 1 if ``func`` is a product of parameters and constants only."""
        if func not in PRODUCTS or not is_taylor(out):
            return
        call = _parts(args, kwargs, self._w, self._delta)
        if call is None:
            return
        y0, y1, y2 = coeffs(out)
        value = y0 + (y2 if y1 is None else y1)
        if y1 is not None and y2 is not None:
            value.add_(y2)
        key, constants = call
        self.noted[(func, *key)].append(_Noted([c.clone() for c in constants], value))
        self.macs += multiply_adds(func, args, value)


class Replay(EagerDispatchMode):
    """For the block: each product that ``recorder`` noted, called again with the parameters at w + Δ (``w1``,
    the tensors f is called with) in their place and constants of the same numbers, returns its noted y(1)
    instead of being computed; each noted value is returned once (a layer run twice on one input is noted twice)."""

    def __init__(self, recorder: Recorder, w1: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._noted, self._at = recorder.noted, _Locator(w1)
        self.reused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and self._noted:
            call = _parts(args, kwargs, self._at)
            candidates = self._noted.get((func, *call[0]), []) if call is not None else []
            for i, noted in enumerate(candidates):
                if all(torch.equal(a, b) for a, b in zip(noted.constants, call[1])):
                    self.reused += 1
                    return candidates.pop(i).value
        return func(*args, **kwargs)


def evaluate_at_one(f: Callable[[dict[str, Tensor]], Tensor], w1: dict[str, Tensor], recorder: Recorder) -> Tensor:
    """f(w1) by a plain forward pass in which every product ``recorder`` noted is reused (``Replay``)."""
    with Replay(recorder, w1):
        return f(w1)
