"""The rule table's registry and the helpers every section shares."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._prims_common
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import RULES, TaylorTensor, TaylorUnsupported, from_coeffs

aten = torch.ops.aten
prims = torch.ops.prims


def _writes_an_argument(op) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def functional_overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            ov = getattr(op, name)
            if not _writes_an_argument(ov):  # in-place and out= overloads are the engine's business
                yield ov
    else:
        yield op


def register(*ops):
    def deco(fn: Callable) -> Callable:
        for op in ops:
            for ov in functional_overloads(op):
                RULES[ov] = fn
        return fn
    return deco


def _op_packet(name: str, ns=aten):
    return getattr(ns, name, None)


def op_packets(names: str, ns=aten) -> list:
    return [p for p in (_op_packet(n, ns) for n in names.split()) if p is not None]


def _any_taylor(vals) -> bool:
    for v in vals:
        if type(v) is TaylorTensor:
            return True
        if isinstance(v, (list, tuple)) and any(type(u) is TaylorTensor for u in v):
            return True
    return False


def need_constant(func, rest, kwargs) -> None:
    if _any_taylor(rest) or _any_taylor(kwargs.values()):
        raise TaylorUnsupported(f"{func}: an α-dependent tensor where the rule needs a constant argument")


def wrap_outputs(o0, o1, o2):
    if isinstance(o0, Tensor):
        return from_coeffs(o0, o1, o2)
    n = len(o0)
    o1 = o1 if o1 is not None else (None,) * n
    o2 = o2 if o2 is not None else (None,) * n
    return type(o0)(from_coeffs(a, b, c) for a, b, c in zip(o0, o1, o2))


def arg_value(func, args, kwargs, name, default=None):
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if i < len(args) and not a.kwarg_only:
                return args[i]
            return a.default_value if a.has_default_value() else default
    return default
