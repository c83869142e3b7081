"""The rule table's registry and the helpers every section shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._prims_common
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import RULES, TaylorTensor, TaylorUnsupported, is_t, make

aten = torch.ops.aten
prims = torch.ops.prims


def _mutates(op) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            ov = getattr(op, name)
            if not _mutates(ov):  # in-place and out= overloads are the engine's business
                yield ov
    else:
        yield op


def register(*ops):
    def deco(fn: Callable) -> Callable:
        for op in ops:
            for ov in _overloads(op):
                RULES[ov] = fn
        return fn
    return deco


def _pk(name: str, ns=aten):
    return getattr(ns, name, None)


def _ops(names: str, ns=aten) -> list:
    return [p for p in (_pk(n, ns) for n in names.split()) if p is not None]


def _has_t(vals) -> bool:
    for v in vals:
        if type(v) is TaylorTensor:
            return True
        if isinstance(v, (list, tuple)) and any(type(u) is TaylorTensor for u in v):
            return True
    return False


def _need_const(func, rest, kwargs) -> None:
    if _has_t(rest) or _has_t(kwargs.values()):
        raise TaylorUnsupported(f"{func}: an α-dependent tensor where the rule needs a constant argument")


def _wrap_out(o0, o1, o2):
    if isinstance(o0, Tensor):
        return make(o0, o1, o2)
    n = len(o0)
    o1 = o1 if o1 is not None else (None,) * n
    o2 = o2 if o2 is not None else (None,) * n
    return type(o0)(make(a, b, c) for a, b, c in zip(o0, o1, o2))


def _dense_like(c: Tensor, c0: Tensor) -> Tensor:
    """c laid out with c0's strides (views of the coefficients must be the views of c0), when c0 is dense."""
    if c.stride() == c0.stride() or not _is_dense(c0):
        return c
    return torch.empty_strided(c0.size(), c0.stride(), dtype=c.dtype, device=c.device).copy_(c)


def _is_dense(t: Tensor) -> bool:
    return torch._prims_common.is_non_overlapping_and_dense_or_false(t)


def root_of(x: TaylorTensor) -> TaylorTensor:
    return x.root if x.root is not None else x


def mark_shared(x: Any) -> None:
    if is_t(x):
        root_of(x).shared = True


def replay(c: Tensor, chain) -> Tensor:
    for func, rest, kwargs, i in chain:
        c = func(c, *rest, **kwargs)
        if i is not None:
            c = c[i]
    return c



def _arg(func, args, kwargs, name, default=None):
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if i < len(args) and not a.kwarg_only:
                return args[i]
            return a.default_value if a.has_default_value() else default
    return default
