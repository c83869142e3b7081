"""The softmax family: softmax, log_softmax, logsumexp."""

from __future__ import annotations

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import from_coeffs
from zeroptim_cli.derivatives.taylor.rules.registry import register

aten = torch.ops.aten


def _dot(s: Tensor, y: Tensor, dim) -> Tensor:
    """⟨s, y⟩ along dim, kept: Σ_dim s·y."""
    return (s * y).sum(dim, keepdim=True)


def _log_softmax_coeffs(s: Tensor, x1, x2, dim):
    """l = x − logsumexp(x): l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩ (s = softmax(x0))."""
    l1 = None if x1 is None else x1 - _dot(s, x1, dim)
    l2 = None
    if x2 is not None:
        l2 = x2 - _dot(s, x2, dim)
    if l1 is not None:
        h = 0.5 * _dot(s, l1 * l1, dim)
        l2 = (-h).expand_as(s) if l2 is None else l2.sub_(h)
    return l1, l2


@register(aten._softmax, aten._safe_softmax)
def _softmax(func, args, kwargs):
    """s = softmax(x): with l = log s, l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩: s1 = s l1,
    s2 = s (l2 + ½ l1²) = s (x2 − ⟨s,x2⟩ − ½⟨s1,l1⟩ + ½ l1²)."""
    x = args[0]
    dim = args[1]
    s = func(x.c0, *args[1:], **kwargs)
    sd = s.to(x.c0.dtype) if s.dtype != x.c0.dtype else s
    x1, x2 = x.c1, x.c2
    s1 = s2 = l1 = None
    if x1 is not None:
        l1 = x1 - _dot(sd, x1, dim)
        s1 = sd * l1
    if x2 is not None or l1 is not None:
        m = None
        if x2 is not None:
            m = _dot(sd, x2, dim)
        if l1 is not None:
            h = 0.5 * _dot(s1, l1, dim)
            m = h if m is None else m.add_(h)
        if x2 is not None:
            s2 = torch.sub(x2, m)
            if l1 is not None:
                s2.addcmul_(l1, l1, value=0.5)
        else:
            s2 = torch.addcmul(-m, l1, l1, value=0.5)
        s2.mul_(sd)
    return from_coeffs(s, *(None if t is None else t.to(s.dtype) for t in (s1, s2)))


@register(aten._log_softmax)
def _log_softmax(func, args, kwargs):
    """log_softmax: l = x − logsumexp(x): l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩ (s = softmax(x0))."""
    x = args[0]
    dim = args[1]
    o0 = func(x.c0, *args[1:], **kwargs)
    s = torch.exp(o0 if o0.dtype == x.c0.dtype else o0.to(x.c0.dtype))
    l1, l2 = _log_softmax_coeffs(s, x.c1, x.c2, dim)
    return from_coeffs(o0, *(None if t is None else t.to(o0.dtype) for t in (l1, l2)))


@register(aten.logsumexp)
def _logsumexp(func, args, kwargs):
    """logsumexp over dims: m1 = ⟨s,x1⟩, m2 = ⟨s,x2⟩ + ½⟨s,(x1 − m1)²⟩ (s = softmax(x0) over dims)."""
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else list(range(x.c0.dim())))
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    dim = [dim] if isinstance(dim, int) else list(dim)
    o0 = func(x.c0, dim, keepdim)
    lse_k = torch.logsumexp(x.c0, dim, keepdim=True)
    s = torch.exp(x.c0 - lse_k)
    outs = [o0]
    m1 = None if x.c1 is None else _dot(s, x.c1, dim)
    m2 = None if x.c2 is None else _dot(s, x.c2, dim)
    if x.c1 is not None:
        d = x.c1 - m1
        v = 0.5 * _dot(s, d * d, dim)
        m2 = v if m2 is None else m2 + v
    for m in (m1, m2):
        outs.append(None if m is None else (m if keepdim else m.squeeze(dim) if dim else m))
    return from_coeffs(*outs)
