"""Metadata in place: transpose_, squeeze_, … on Taylor tensors (how they keep a view family right: ``views.py``).

Private torch API used here: ``torch.utils._mode_utils.no_dispatch`` (to change the wrapper's own sizes and strides
without dispatching to the rules again).
"""

from __future__ import annotations

import torch

from zeroptim_cli.derivatives.taylor._core import RULES, TaylorUnsupported, is_taylor
from zeroptim_cli.derivatives.taylor.rules.registry import need_constant

aten = torch.ops.aten


def _meta_inplace(functional):
    """transpose_, squeeze_, … change only sizes and strides: each coefficient becomes the functional view (new
    objects, so a coefficient shared with another tensor is left alone) and the wrapper's own metadata is
    changed in place with Python dispatch off."""
    from torch.utils._mode_utils import no_dispatch

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        need_constant(func, rest, kwargs)
        if not is_taylor(x):
            return func(x, *rest, **kwargs)
        if x.views and any(r() is not None for r in x.views):
            raise TaylorUnsupported(f"{func}: in-place metadata change of a tensor that has live views")
        x.c0 = functional(x.c0, *rest, **kwargs)
        x.c1 = None if x.c1 is None else functional(x.c1, *rest, **kwargs)
        x.c2 = None if x.c2 is None else functional(x.c2, *rest, **kwargs)
        if x.root is not None:
            x.chain = x.chain + ((functional, rest, kwargs, None),)
        with no_dispatch():
            func(x, *rest, **kwargs)
        return x
    return rule


for _name, _fn in (("transpose_", aten.transpose.int), ("t_", aten.t.default), ("squeeze_", None),
                   ("unsqueeze_", aten.unsqueeze.default), ("as_strided_", aten.as_strided.default),
                   ("swapdims_", aten.transpose.int), ("swapaxes_", aten.transpose.int)):
    _pkt = getattr(aten, _name, None)
    if _pkt is None:
        continue
    for _ov in _pkt.overloads():
        _f = _fn if _fn is not None else getattr(aten.squeeze, _ov, None)
        if _f is not None:
            RULES[getattr(_pkt, _ov)] = _meta_inplace(_f)
