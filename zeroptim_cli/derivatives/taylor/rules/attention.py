"""Causal scaled-dot-product attention, one rule for the whole of it, computed in blocks of query rows.

Written out, ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` is A = s·qkᵀ with the entries above the
diagonal set to −∞, P = softmax(A) along the keys and O = P v (s the scale, 1/√E by default). Decomposed into
its ops, every product of Taylor mode is a full L×S one, although causality leaves half of each zero. This rule
cuts the queries into blocks of rows; a block whose last row is i multiplies only keys 0…i, so the products cover
a staircase just above the triangle (``query_blocks``: about (n + 1)/(2n) of the square for n blocks).

Per block, the coefficients (order k of a product is the sum over i + j = k of order i of one factor with order
j of the other):

    A1 = s·(q1 k0ᵀ + q0 k1ᵀ),  A2 = s·(q2 k0ᵀ + q1 k1ᵀ + q0 k2ᵀ)   — each one product along the concatenated
                                                                     head dimension ([q1, q0]·[k0, k1]ᵀ, …)
    P0 = softmax(A0),  l1 = A1 − ⟨P0, A1⟩,  P1 = P0 l1,
    P2 = P0 (A2 − ⟨P0, A2⟩ − ½⟨P1, l1⟩ + ½ l1²)                     — ⟨·,·⟩ along the keys, as ``softmax.py``
    O0 = P0 v0,  O1 = P1 v0 + P0 v1,  O2 = P2 v0 + P1 v1 + P0 v2

(``_block`` reaches O1 and O2 without forming P1 and P2, in six passes over a block's scores besides the softmax.)

The masked entries have P0 = 0, so P1 = P2 = 0 there whatever A1 and A2 hold. Only this case — no mask, no
dropout, float32 or float64, at least one α-dependent argument — takes the rule (``sdpa``); every other call
returns ``NotImplemented`` and goes through SDPA's math kernel and the rules of its ops as before.

SDPA is a composite op: the dispatcher decomposes it before a Taylor tensor's ``__torch_dispatch__`` sees it, so
this rule is reached from ``TaylorTensor.__torch_function__`` (``_core``), which hands it every call of
``torch._C._nn.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zeroptim_cli.derivatives.kernels import SDPA, sdpa_arguments
from zeroptim_cli.derivatives.taylor._core import FUNCTION_RULES, coeffs, from_coeffs, is_taylor

__all__ = ["sdpa", "query_blocks"]

#: the fewest query rows in a block: smaller blocks would save little arithmetic and cost more calls
MIN_BLOCK_ROWS = 64
#: at most this many blocks: n blocks compute (n + 1)/(2n) of the square, 56 % at 8
MAX_BLOCKS = 8


def query_blocks(length: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) blocks of ``length`` query rows: at most ``MAX_BLOCKS``, each of at least
    ``MIN_BLOCK_ROWS`` rows (one block for a short sequence), as equal as they come."""
    n = max(1, min(MAX_BLOCKS, length // MIN_BLOCK_ROWS))
    edges = [round(i * length / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _stacked(pairs: list[tuple[Tensor | None, Tensor | None]]) -> tuple[Tensor, Tensor] | None:
    """(a, b) with a bᵀ = Σ a_i b_iᵀ over the pairs whose factors are both nonzero: the factors concatenated
    along the last dimension ([a, a′, …] and [b, b′, …], contiguous), None where every pair has a zero factor."""
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    return torch.cat([a for a, _ in pairs], -1), torch.cat([b for _, b in pairs], -1)


def _block(scores: list, values: Tensor, orders: list[int], start: int, stop: int, out: list) -> None:
    """O0, O1, O2 of query rows [start, stop) against keys 0 … min(stop, S) − 1, written into those rows of
    ``out`` (None for a coefficient that is zero), from the stacked factors of A0, A1, A2 (``_stacked``, q already
    scaled) and v's nonzero coefficients side by side in ``values`` (of the ``orders`` listed, ascending: one
    product P0·[v0, v1, v2] gives three).

    P1 and P2 are never formed: with E1 = P0 A1, d1 = ΣE1 (= ⟨P0, A1⟩), B = A2 + ½ l1², C = P0 B and
    m = ΣC (= ⟨P0, A2⟩ + ½⟨P1, l1⟩), P1 = E1 − d1 P0 and P2 = C − m P0, so (sums along the keys)

        O1 = E1 v0 + P0 v1 − d1 O0,   O2 = C v0 + E1 v1 + P0 v2 − d1 (P0 v1) − m O0.
    """
    keys = min(stop, values.shape[-2])
    a = [None if f is None else f[0][..., start:stop, :] @ f[1][..., :keys, :].transpose(-2, -1) for f in scores]
    if keys > start + 1:  # row i sees keys j ≤ i only: the masked entries lie in the columns start … keys − 1
        a[0][..., start:keys].add_(torch.full((stop - start, keys - start), float("-inf"), dtype=a[0].dtype,
                                              device=a[0].device).triu_(1))  # 0 where seen, −∞ where masked
    p0 = torch.softmax(a[0], -1)
    values = values[..., :keys, :]
    width = values.shape[-1] // len(orders)

    def times(p: Tensor | None, upto: int) -> list:
        """[p v0, p v1, …, p v_upto], None for a zero factor, from one product with v's columns side by side."""
        present = [n for n in orders if n <= upto]
        if p is None:
            return [None] * (upto + 1)
        parts = (p @ values[..., :width * len(present)]).split(width, -1)
        got = dict(zip(present, parts))
        return [got.get(n) for n in range(upto + 1)]

    e1 = d1 = c = m = None
    if a[1] is not None:
        e1 = p0 * a[1]
        d1 = e1.sum(-1, keepdim=True)
    if a[2] is not None or a[1] is not None:
        b = a[2]
        if a[1] is not None:
            l1 = a[1].sub_(d1)
            b = torch.mul(l1, l1).mul_(0.5) if b is None else b.addcmul_(l1, l1, value=0.5)
        c = b.mul_(p0)
        m = c.sum(-1, keepdim=True)
    p0v, e1v, cv = times(p0, 2), times(e1, 1), times(c, 0)
    o0 = p0v[0]
    rows = slice(start, stop)
    out[0][..., rows, :].copy_(o0)
    _combine_into(out[1], rows, (e1v[0], p0v[1]), ((d1, o0),))
    _combine_into(out[2], rows, (cv[0], e1v[1], p0v[2]), ((d1, p0v[1]), (m, o0)))


def _combine_into(dst: Tensor | None, rows: slice, plus: tuple, minus: tuple) -> None:
    """dst's query rows ← Σ plus − Σ d·t over the pairs (d, t) of ``minus``, zero terms (None) skipped, with no
    temporary: the first two terms are added into dst, the rest in place. dst is None exactly where every term is."""
    if dst is None:
        return
    dst = dst[..., rows, :]
    terms = [t for t in plus if t is not None]
    if len(terms) > 1:
        torch.add(terms[0], terms[1], out=dst)
    else:
        dst.copy_(terms[0])
    for t in terms[2:]:
        dst.add_(t)
    for d, t in minus:
        if d is not None and t is not None:
            dst.addcmul_(d, t, value=-1)


def sdpa(args: tuple, kwargs: dict) -> Tensor | object:
    """The Taylor tensor of causal ``scaled_dot_product_attention(query, key, value, is_causal=True)`` without a
    mask or dropout (module docstring), or ``NotImplemented`` for any other call."""
    given = sdpa_arguments(args, kwargs)
    if given is None:
        return NotImplemented
    query, key, value = given["query"], given["key"], given["value"]
    if (not any(is_taylor(t) for t in (query, key, value)) or given["attn_mask"] is not None
            or given["dropout_p"] != 0.0 or given["is_causal"] is not True
            or any(t.dtype not in (torch.float32, torch.float64) or t.dtype != query.dtype or t.dim() < 2
                   for t in (query, key, value))
            or query.shape[-2] < 2 or key.shape[-2] != value.shape[-2]):
        return NotImplemented
    scale = given["scale"]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q = [None if t is None else t * scale for t in coeffs(query)]
    k, v = list(coeffs(key)), list(coeffs(value))
    if given["enable_gqa"] and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        k = [None if t is None else t.repeat_interleave(groups, -3) for t in k]
        v = [None if t is None else t.repeat_interleave(groups, -3) for t in v]
    scores = _score_factors(q, k)
    orders = [n for n in range(3) if v[n] is not None]
    values = torch.cat([v[n] for n in orders], -1)
    a1, a2 = scores[1] is not None, scores[2] is not None
    present = (True, a1 or 1 in orders, a1 or a2 or 2 in orders)  # which of O0, O1, O2 are nonzero (_block)
    batch = torch.broadcast_shapes(q[0].shape[:-2], k[0].shape[:-2], values.shape[:-2])
    shape = (*batch, q[0].shape[-2], values.shape[-1] // len(orders))
    outs = [torch.empty(shape, dtype=values.dtype, device=values.device) if p else None for p in present]
    for start, stop in query_blocks(query.shape[-2]):
        _block(scores, values, orders, start, stop, outs)
    return from_coeffs(*outs)


def _score_factors(q: list, k: list) -> list:
    """The stacked factors of A0, A1, A2 (``_stacked``: A_n = Σ_{i+j=n} q_i k_jᵀ). With every coefficient nonzero,
    views of two concatenations Q = [q2, q1, q0] and K = [k0, k1, k2]: A_n pairs Q's last n + 1 blocks with K's
    first n + 1, so each coefficient is copied once, not once per order it enters."""
    if any(t is None for t in (*q, *k)):
        return [_stacked([(q[i], k[n - i]) for i in range(n + 1)]) for n in range(3)]
    width = q[0].shape[-1]
    qs, ks = torch.cat(q[::-1], -1), torch.cat(k, -1)
    return [(qs[..., (2 - n) * width:], ks[..., :(n + 1) * width]) for n in range(3)]


FUNCTION_RULES[SDPA] = sdpa
