"""View families: how a Taylor tensor and its views keep aliasing their coefficients, so that an in-place write
into one of them reaches all of them, as it does for plain tensors.

This module is the one description of the protocol; ``_core``, ``engine`` and the rules refer here.

**The fields.** Every ``TaylorTensor`` carries four (set in ``TaylorTensor.__new__``):

- ``root``: for a view, the tensor it is a view of, followed to the top (a root is never itself a view); ``None``
  for a tensor that is not a view.
- ``chain``: for a view, the view ops that lead from the root's coefficients to its own, each as
  ``(op, arguments after the first, kwargs, output index or None)``; ``replay`` applies them to a coefficient.
- ``views``: for a root, weak references to its views (``None`` until it has one; dead references are dropped
  once there are more than 256).
- ``shared``: a root's coefficient may be the very object of another tensor's coefficient (a rule such as
  ``x + constant`` passes a coefficient through and calls ``mark_shared``), so it is copied before the family is
  written in place.

A tensor is in a family (``in_family``) when it is a view or has views.

**Who does what.**

- A view op (``rules.linear.view_rule``): a root's coefficients are first laid out like its c0 (``dense_like``:
  a view of a coefficient must be the same view as of c0), the op is applied to each coefficient, and
  ``record_views`` links every Taylor output to the root.
- An in-place op on a member of a family (``engine``'s in-place wrapper): ``prepare_family`` gives the root
  coefficients of its own (copying shared ones, adding zeros for an order the write needs) and re-derives every
  view's from them (``refresh_views``); the functional result is then copied into the member's coefficients,
  which alias the root's, so every member sees the write.
- An in-place metadata change (``rules.metadata_inplace``): refused while the tensor has live views; a view's
  chain gets the functional op appended.

Private torch API used here: ``torch._prims_common.is_non_overlapping_and_dense_or_false``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch._prims_common
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import TaylorTensor, is_taylor

__all__ = ["root_of", "in_family", "mark_shared", "dense_like", "record_views", "replay", "prepare_family"]

_PRUNE_AT = 256  # dead weak references kept in a root's ``views`` before they are dropped


def is_dense(t: Tensor) -> bool:
    """Whether t's memory is non-overlapping and dense (any order of strides)."""
    return torch._prims_common.is_non_overlapping_and_dense_or_false(t)


def dense_like(c: Tensor, c0: Tensor) -> Tensor:
    """c laid out with c0's strides (views of the coefficients must be the views of c0), when c0 is dense."""
    if c.stride() == c0.stride() or not is_dense(c0):
        return c
    return torch.empty_strided(c0.size(), c0.stride(), dtype=c.dtype, device=c.device).copy_(c)


def root_of(x: TaylorTensor) -> TaylorTensor:
    """The root of x's family (x itself when x is not a view)."""
    return x.root if x.root is not None else x


def in_family(x: TaylorTensor) -> bool:
    """Whether x is a view or has views (an in-place write must then reach the whole family)."""
    return x.root is not None or bool(x.views)


def mark_shared(x: Any) -> None:
    """Note that a coefficient of x's root is now also another tensor's (copy it before an in-place write)."""
    if is_taylor(x):
        root_of(x).shared = True


def record_views(x: TaylorTensor, out: Any, func, rest: tuple, kwargs: dict) -> None:
    """Link every Taylor tensor of ``out`` = ``func(x, *rest, **kwargs)`` (a view op) to x's root: its chain is
    x's chain plus this op (with the output's index when the op returns several)."""
    root = root_of(x)
    if root.views is None:
        root.views = []
    elif len(root.views) > _PRUNE_AT:
        root.views = [r for r in root.views if r() is not None]
    single = isinstance(out, Tensor)
    for i, o in enumerate((out,) if single else out):
        if is_taylor(o):
            o.root = root
            o.chain = x.chain + ((func, rest, kwargs, None if single else i),)
            root.views.append(weakref.ref(o))


def replay(c: Tensor, chain) -> Tensor:
    """The view of a root coefficient c that ``chain`` describes."""
    for func, rest, kwargs, i in chain:
        c = func(c, *rest, **kwargs)
        if i is not None:
            c = c[i]
    return c


def refresh_views(root: TaylorTensor, k: int) -> None:
    """Re-derive the order-k coefficient of every live view of root from root's own."""
    c = root.c1 if k == 1 else root.c2
    for ref in root.views or ():
        v = ref()
        if v is not None:
            vk = None if c is None else replay(c, v.chain)
            if k == 1:
                v.c1 = vk
            else:
                v.c2 = vk


def prepare_family(self: TaylorTensor, need: tuple[bool, bool]) -> None:
    """Before writing into a view family in place: give the root its own coefficients (copying any it shares
    with another tensor) and a zero coefficient for each order the write needs, then re-derive every view's."""
    root = root_of(self)
    for k, needed in ((1, need[0]), (2, need[1])):
        c = root.c1 if k == 1 else root.c2
        if c is None and not needed:
            continue
        if c is None:
            c = torch.zeros_like(root.c0)
        elif root.shared:
            c = torch.empty_like(root.c0).copy_(c) if is_dense(root.c0) else c.clone()
        else:
            continue
        if k == 1:
            root.c1 = c
        else:
            root.c2 = c
        refresh_views(root, k)
    root.shared = False
