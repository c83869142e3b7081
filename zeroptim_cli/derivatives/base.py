"""What every differentiation method returns, and the sums over batches and ranks of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from zeroptim_cli import distributed as dist
from zeroptim_cli.vectors import Params, flatten, unflatten

#: f as a function of the parameters, for one batch term.
ScalarFn = Callable[[Params], Tensor]


class LazyParams:
    """Parameters made on the first call and kept (w_t1 in the analysis dtype, for a method that may take f(w_t1)
    beside its derivatives: ``Method.value_at_w1``); ``made`` says whether they have been, ``forget`` drops them."""

    def __init__(self, make: Callable[[], Params]) -> None:
        self._make, self._params = make, None

    def __call__(self) -> Params:
        if self._params is None:
            self._params = self._make()
        return self._params

    @property
    def made(self) -> bool:
        return self._params is not None

    def forget(self) -> None:
        self._params = None


@dataclass(frozen=True)
class Derivatives:
    """f(w), gᵀΔ and ΔᵀHΔ, with g and HΔ themselves when the method yields them, and f(w_t1) when it took that
    on the same batch term too (Taylor mode, reusing a product exact in α: ``taylor.exact``)."""

    loss: Tensor
    grad_corr: Tensor
    dir_sharpness: Tensor
    grad: Params | None = None
    hvp: Params | None = None
    loss_t1: Tensor | None = None


def axpy(c: float, d: Derivatives, acc: Derivatives | None) -> Derivatives:
    """c·d + acc, field by field (acc = None counts as zero), accumulated into acc's own tensors in place:
    summing many batch chunks allocates no parameter-sized temporaries."""

    def comb(x: Any, y: Any) -> Any:
        if x is None:
            return None
        if y is None:
            return {k: c * v for k, v in x.items()} if isinstance(x, dict) else c * x
        if isinstance(x, dict):
            for k, v in x.items():
                y[k].add_(v, alpha=c)
            return y
        return y.add_(x, alpha=c)

    if acc is None:
        return Derivatives(*(comb(getattr(d, f.name), None) for f in fields(Derivatives))) if c != 1.0 else d
    return Derivatives(*(comb(getattr(d, f.name), getattr(acc, f.name)) for f in fields(Derivatives)))


def all_reduce(d: Derivatives) -> Derivatives:
    """Σ over torchrun ranks of every field of ``d`` but f(w_t1), which no rank takes under torchrun (its
    ranks would have to agree on whether each did), in one all-reduce (identity without torchrun)."""
    if not dist.active():
        return d
    scalars = torch.stack([d.loss.reshape(()), d.grad_corr.reshape(()), d.dir_sharpness.reshape(())])
    flat = dist.all_reduce_sum(torch.cat([scalars] + [flatten(p) for p in (d.grad, d.hvp) if p is not None]))
    i = 3
    rebuilt: list[Params | None] = []
    for p in (d.grad, d.hvp):
        if p is None:
            rebuilt.append(None)
            continue
        n = sum(t.numel() for t in p.values())
        rebuilt.append(unflatten(flat[i:i + n], p))
        i += n
    return Derivatives(flat[0], flat[1], flat[2], *rebuilt)
