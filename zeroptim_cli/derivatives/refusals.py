"""How a differentiation method says "not this f": a declared refusal, never a silent wrong number.

Each method has its own ``Refusal`` subclass (``methods.METHODS`` records which). A refusal names the op
that stopped the method and says why, on one line; the objective then tries the method's fallbacks (and
says so in ``warnings``). Any other exception is an error: it is reported, never hidden by a fallback.

torch itself reports a missing derivative by message only (a ``RuntimeError`` or ``NotImplementedError``),
so ``torch_refusal`` reads those messages: the patterns below are all torch 2.x uses for "this op has no
double backward / no forward-mode AD", plus the two functorch limits that forward mode meets.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class Refusal(Exception):
    """A method cannot differentiate this f exactly. ``op``: the op (or construct) at fault."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"{op}: {reason}" if reason else op)
        self.op, self.reason = op, reason


class NoDoubleBackward(Refusal):
    """reverse-over-reverse: some op on the way has no differentiable backward."""


class NoForwardAD(Refusal):
    """forward-over-reverse, forward-over-forward: some op has no forward-mode AD rule (or functorch
    cannot transform it)."""


class NoTaylorRule(Refusal):
    """taylor: some op has no exact Taylor rule (``derivatives/taylor``)."""


#: (pattern, what it means); group 1, where there is one, is the op.
_TORCH_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"derivative for '?([\w:.]+)'? is not implemented"), "torch has no derivative of it"),
    (re.compile(r"forward AD with '?([\w:.]+)'? that does not support it"), "torch has no forward-mode AD for it"),
    (re.compile(r"function '([\w:.]+)' is not differentiable with respect to argument"),
     "torch does not differentiate it with respect to an argument that depends on w"),
    (re.compile(r"(ZeroTensor)s are immutable"), "torch's forward mode hands out an immutable zero tangent"),
    (re.compile(r"(autograd\.Function) with functorch transforms"),
     "a custom autograd.Function without setup_context cannot be transformed by torch.func"),
    (re.compile(r"(once_differentiable)"), "a custom autograd.Function's backward is not differentiable"),
)


def torch_refusal(exc: BaseException) -> tuple[str, str] | None:
    """(op, reason) when ``exc`` is torch saying an op lacks the derivative a method needs; else None."""
    if not isinstance(exc, (RuntimeError, NotImplementedError)):
        return None
    text = str(exc)
    for pattern, reason in _TORCH_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1), reason
    return None


@contextlib.contextmanager
def torch_refusals_as(kind: type[Refusal]) -> Iterator[None]:
    """Inside the block, torch's own "this op lacks that derivative" errors (``torch_refusal``) are raised as
    the method's refusal ``kind``; every other exception passes unchanged."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        found = torch_refusal(exc)
        if found is None:
            raise
        raise kind(*found) from exc
