"""The Taylor tensor and the dispatch from an ATen op to its rule.

A ``TaylorTensor`` is a wrapper subclass whose metadata (shape, strides, dtype) is that of ``c0`` and which
carries the truncated polynomial x(α) = c0 + c1·α + c2·α² (``None`` for a zero coefficient). Every ATen op
that receives one lands in ``TaylorTensor.__torch_dispatch__`` and is sent to exactly one of: a rule in
``RULES``, an in-place wrapper around the functional rule, a decomposition (torch's table or the op's own
CompositeImplicit kernel) whose pieces dispatch here again, or ``TaylorUnsupported``.

The view-family fields every Taylor tensor carries (``root``, ``chain``, ``views``, ``shared``) are described in
``views.py``.

A composite op that the dispatcher decomposes before ``__torch_dispatch__`` (SDPA) can have a rule of its own in
``FUNCTION_RULES``, reached from ``__torch_function__``; every other call passes that layer straight on.

Private torch APIs used here: ``Tensor._make_wrapper_subclass`` (a tensor with metadata and no storage of its
own), ``torch._C.DisableTorchFunctionSubclass`` (no ``__torch_function__`` layer below ours),
``torch._C._is_fwd_grad_enabled`` (to detect a custom ``autograd.Function`` forward) and ``torch._C._set_grad_enabled``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["TaylorUnsupported", "TaylorTensor", "RULES", "FUNCTION_RULES", "coeffs", "from_coeffs", "is_taylor"]


class TaylorUnsupported(Exception):
    """Taylor mode cannot evaluate this f exactly; the message names the op and why, on one line."""


# op (OpOverload) -> rule(func, args, kwargs). Filled by the rules package; resolved lazily by engine.resolve.
RULES: dict[Any, Callable] = {}
_RESOLVER: list[Callable] = []  # engine.resolve, installed by engine.py
# Python-level function -> rule(args, kwargs) returning a result or NotImplemented: for composite ops that the
# dispatcher decomposes before ``__torch_dispatch__`` sees them (rules/attention.py). Filled by the rules package.
FUNCTION_RULES: dict[Callable, Callable] = {}


class _State(threading.local):
    depth = 0            # > 0 while a rule (or a decomposition) of ours is running
    recorder = None      # an ``exact.Recorder`` noting the products of f's own ops, or None


STATE = _State()


class TaylorTensor(Tensor):
    """x(α) = c0 + c1 α + c2 α² along one direction; the tensor's own metadata is c0's."""

    @staticmethod
    def __new__(cls, c0: Tensor, c1: Tensor | None, c2: Tensor | None):
        """A wrapper with c0's metadata around the coefficients (c0, c1, c2); no view family yet."""
        r = Tensor._make_wrapper_subclass(cls, c0.size(), strides=c0.stride(), storage_offset=c0.storage_offset(),
                                          dtype=c0.dtype, device=c0.device, requires_grad=False)
        r.c0, r.c1, r.c2 = c0, c1, c2
        # The view-family fields: what they mean and who sets them is described in ``views.py``.
        r.root = None
        r.chain = ()
        r.views = None
        r.shared = False
        return r

    def __init__(self, *a, **k):
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """A function with a rule of its own in ``FUNCTION_RULES`` (outside a no_grad block, where its result
        is a constant) runs that rule unless it returns NotImplemented; every call otherwise goes on to the ops'
        dispatch, with no ``__torch_function__`` layer for what they return."""
        kwargs = kwargs or {}
        rule = FUNCTION_RULES.get(func)
        st = STATE
        if rule is not None and st.depth == 0 and torch.is_grad_enabled() and torch._C._is_fwd_grad_enabled():
            st.depth += 1  # as in ``__torch_dispatch__``: the rule's own ops record no graph
            torch._C._set_grad_enabled(False)
            try:
                out = rule(args, kwargs)
            finally:
                torch._C._set_grad_enabled(True)
                st.depth -= 1
            if out is not NotImplemented:
                return out
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __repr__(self) -> str:  # never dispatch from repr
        return f"TaylorTensor(c0={self.c0!r}, c1={self.c1!r}, c2={self.c2!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """Send an op on Taylor tensors to its rule (``RULES``, else ``engine.resolve``), with grad mode off
        while the rule runs; refuse inside a custom autograd.Function forward; a no_grad block gives constants."""
        kwargs = kwargs or {}
        st = STATE
        if st.depth == 0:
            if not torch._C._is_fwd_grad_enabled():
                # autograd.Function.apply runs forward with forward-AD disabled; nothing else in f does.
                raise TaylorUnsupported(
                    f"{func} on an α-dependent tensor inside a custom torch.autograd.Function forward: its backward "
                    "may be a surrogate (e.g. straight-through), so Taylor mode of the forward would differ from autograd")
            if not torch.is_grad_enabled():
                # A no_grad block inside f: to autograd its outputs are constants; so they are here.
                return _constant(func, args, kwargs)
        rule = RULES.get(func)
        if rule is None:
            rule = _RESOLVER[0](func)
        st.depth += 1
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            out = rule(func, args, kwargs)
        finally:
            torch._C._set_grad_enabled(prev)
            st.depth -= 1
        if st.recorder is not None and st.depth == 0:
            st.recorder.note(func, args, kwargs, out)
        return out


def is_taylor(x: Any) -> bool:
    """Whether x is a Taylor tensor (exact type: rules never see subclasses of it)."""
    return type(x) is TaylorTensor


def coeffs(x: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """(c0, c1, c2) of x; a plain value is (x, None, None)."""
    if type(x) is TaylorTensor:
        return x.c0, x.c1, x.c2
    return x, None, None


def from_coeffs(c0: Tensor, c1: Tensor | None, c2: Tensor | None) -> Tensor:
    """The tensor with coefficients (c0, c1, c2): plain c0 where c1 = c2 = 0 (None), else a Taylor tensor."""
    if c1 is None and c2 is None:
        return c0
    return TaylorTensor(c0, c1, c2)


def _values_at_zero(a: Any) -> Any:
    """a with every Taylor tensor replaced by its c0 (through lists and tuples)."""
    if type(a) is TaylorTensor:
        return a.c0
    if isinstance(a, (list, tuple)):
        return type(a)(_values_at_zero(b) for b in a)
    return a


def _constant(func, args, kwargs):
    """Evaluate on the c0s only: the result does not depend on α (or is treated as not, like autograd does)."""
    return func(*_values_at_zero(args), **{k: _values_at_zero(v) for k, v in kwargs.items()})
