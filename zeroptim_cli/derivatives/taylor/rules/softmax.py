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


#: Bytes of the products ``_row_dot`` forms at a time: cache-sized, and below the size from which streaming's
#: allocator maps every block afresh (``allocator.MMAP_THRESHOLD``).
ROW_DOT_BYTES = 2**19


def _row_dot(s: Tensor, y: Tensor, dim) -> Tensor:
    """⟨s, y⟩ along dim, kept, as ``_dot``; along the last dim of same-shaped tensors whose product exceeds one
    block (``ROW_DOT_BYTES``), a block of rows at a time, so that no product the size of s is written (a language
    model's logits: 32 MiB per coefficient at 256 tokens of a 32000-token vocabulary). Under one block the product
    is formed whole: the blocks' slicing would cost more than it."""
    dtype = torch.promote_types(s.dtype, y.dtype)
    if dim not in (-1, s.dim() - 1) or s.shape != y.shape or s.dim() == 0 or s.numel() * dtype.itemsize <= ROW_DOT_BYTES:
        return _dot(s, y, dim)
    n = s.shape[-1]
    a, b = s.reshape(-1, n), y.reshape(-1, n)
    out = torch.empty(a.shape[0], 1, dtype=dtype, device=s.device)
    step = max(1, ROW_DOT_BYTES // (n * dtype.itemsize))
    for i in range(0, a.shape[0], step):
        torch.sum(a[i:i + step] * b[i:i + step], -1, keepdim=True, out=out[i:i + step])
    return out.view(*s.shape[:-1], 1)


def _log_softmax_coeffs(s: Tensor, x1, x2, dim):
    """l = x − logsumexp(x): l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩ (s = softmax(x0)). Consumes ``s``
    (it becomes s·l1 in place), so that l1 and l2 are its only full-size results besides s (``_row_dot``)."""
    m2 = None if x2 is None else _row_dot(s, x2, dim)
    l1 = None if x1 is None else x1 - _row_dot(s, x1, dim)
    h = None if l1 is None else _row_dot(s.mul_(l1), l1, dim).mul_(0.5)
    if x2 is None:
        return l1, (None if h is None else (-h).expand_as(l1))
    return l1, x2 - (m2 if h is None else m2.add_(h))


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
