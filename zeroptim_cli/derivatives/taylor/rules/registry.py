"""The rule table's registry and the helpers every section shares.

Every rule has the signature ``rule(func, args, kwargs)`` of ``__torch_dispatch__`` and is registered for an op's
functional overloads with ``@register(aten.op)``; the table is ``_core.RULES``.

Private torch APIs used here: ``torch._ops.OpOverloadPacket`` (to tell a packet from an overload) and
``OpOverload._schema`` (argument names, defaults and alias information).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import RULES, TaylorTensor, TaylorUnsupported, from_coeffs

aten = torch.ops.aten


def _writes_an_argument(op) -> bool:
    """Whether an overload writes into one of its arguments (in-place or ``out=``)."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def functional_overloads(op):
    """The overloads of an op (packet or overload) that write into no argument: those a rule is registered
    for (in-place and ``out=`` overloads are resolved by ``engine``)."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            ov = getattr(op, name)
            if not _writes_an_argument(ov):  # in-place and out= overloads are the engine's business
                yield ov
    else:
        yield op


def register(*ops):
    """Decorator: ``fn`` becomes the rule of every functional overload of each op in ``ops``."""
    def deco(fn: Callable) -> Callable:
        for op in ops:
            for ov in functional_overloads(op):
                RULES[ov] = fn
        return fn
    return deco


def _op_packet(name: str, ns=aten):
    """The op packet ``ns.name``, or None where this torch has no such op."""
    return getattr(ns, name, None)


def op_packets(names: str, ns=aten) -> list:
    """The op packets named in the space-separated ``names`` that this torch has."""
    return [p for p in (_op_packet(n, ns) for n in names.split()) if p is not None]


def _any_taylor(vals) -> bool:
    """Whether any of ``vals`` (or of a list or tuple among them) is a Taylor tensor."""
    for v in vals:
        if type(v) is TaylorTensor:
            return True
        if isinstance(v, (list, tuple)) and any(type(u) is TaylorTensor for u in v):
            return True
    return False


def need_constant(func, rest, kwargs) -> None:
    """Refuse (``TaylorUnsupported``) where an argument the rule treats as constant depends on α."""
    if _any_taylor(rest) or _any_taylor(kwargs.values()):
        raise TaylorUnsupported(f"{func}: an α-dependent tensor where the rule needs a constant argument")


def wrap_outputs(o0, o1, o2):
    """The Taylor tensor(s) of an op's output(s) from per-order outputs: one tensor, or a tuple/list of them
    (o1, o2 then tuples too, or None for all zero)."""
    if isinstance(o0, Tensor):
        return from_coeffs(o0, o1, o2)
    n = len(o0)
    o1 = o1 if o1 is not None else (None,) * n
    o2 = o2 if o2 is not None else (None,) * n
    return type(o0)(from_coeffs(a, b, c) for a, b, c in zip(o0, o1, o2))


def arg_value(func, args, kwargs, name, default=None):
    """The value of the op's argument ``name`` as called: from kwargs, positionally, or the schema's default."""
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if i < len(args) and not a.kwarg_only:
                return args[i]
            return a.default_value if a.has_default_value() else default
    return default
