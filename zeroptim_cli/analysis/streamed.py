"""The pair analysis of a model larger than memory: Taylor mode with its parameters streamed.

The model is a skeleton (``models.skeleton``: parameters on the meta device); each parameter of w_t and
w_t1 is read when its module runs (``derivatives.streaming``) and released after, so the peak memory is
the Taylor activations plus a few modules' weights, not the model. The quantities are those of
``analysis.pair`` with ``method="taylor"``, the same numbers:

* f(w_t), gᵀΔ, ΔᵀHΔ: one Taylor-mode pass, each parameter entering as (w_t, Δ, 0);
* f(w_t1): one forward pass with each parameter read from w_t1;
* ‖Δ_l‖²: from each Δ_l as the Taylor pass forms it (a tensor no forward uses is read for it alone);
* with ``critical_tol``: the critical-scale search (``analysis.critical``), one streamed forward pass per α.

No g and no HΔ, as for in-memory Taylor mode: no extras and no direction other than the update.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from zeroptim_cli.analysis.critical import critical_search
from zeroptim_cli.analysis.pair import prepared, require_finite, summarize_rows
from zeroptim_cli.analysis.result import PairAnalysis
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.derivatives.streaming import Point, pair_point, streamed
from zeroptim_cli.io.batches import Batch

#: Reads one parameter of w_t on the run's device, in its dtype.
Read = Callable[[], Tensor]
#: Reads the same parameter of w_t1, less its argument when one is given (Δ = w_t1 − w_t).
ReadLess = Callable[[Tensor | None], Tensor]


def squared_norm(t: Tensor, piece: int = 2**22) -> Tensor:
    """‖t‖² in float64, summed piece by piece: no temporary the size of ``t`` (an embedding's Δ is large)."""
    return torch.stack([p.pow(2).sum(dtype=torch.float64) for p in t.reshape(-1).split(piece)]).sum()


class PairLoader:
    """The parameters at the current ``point`` for ``derivatives.streaming``, read from ``sources``
    (name → (read w_t, read w_t1)); keeps ‖Δ_l‖² of every Δ_l it forms."""

    def __init__(self, sources: Mapping[str, tuple[Read, ReadLess]]) -> None:
        self.sources = sources
        self.point: Point = "taylor"
        self.update_sq: dict[str, Tensor] = {}

    def __call__(self, name: str) -> Tensor:
        value, delta = pair_point(*self.sources[name], self.point)
        if delta is not None and name not in self.update_sq:
            self.update_sq[name] = squared_norm(delta)
        return value

    def squared_norms(self) -> dict[str, Tensor]:
        """‖Δ_l‖² of every parameter, reading those no forward pass formed Δ_l of."""
        for name, (read_t, read_t1) in self.sources.items():
            if name not in self.update_sq:
                self.update_sq[name] = squared_norm(read_t1(read_t()))
        return {name: self.update_sq[name] for name in self.sources}


def analyze_streamed(
    model: nn.Module,
    sources: Mapping[str, tuple[Read, ReadLess]],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    loss: Loss,
    evaluation: Evaluation = Evaluation(),
    *,
    loss_t1: float | None = None,
    critical_tol: float | None = None,
    analysed: Collection[str] | None = None,
) -> PairAnalysis:
    """``analysis.pair.analyze_pair(..., method="taylor")`` for a skeleton ``model`` whose parameters
    ``sources`` reads (name as in ``named_parameters()`` → readers of w_t and w_t1, on the evaluation's device
    in its dtype); ``buffers`` are checkpoint t's. The evaluation's method is taken to be ``taylor``, and its
    ``chunk_size="auto"`` evaluates whole batches (measuring activations would need the parameters
    resident); a number cuts them as in memory. ``analysed`` (default: all) names the parameters the per-layer
    split is over (the trainable ones: ``analysis.trainable``; the others' Δ is zero)."""
    chunk_size = evaluation.chunk_size
    evaluation = replace(evaluation, method="taylor", chunk_size=0 if chunk_size == "auto" else chunk_size)
    device, dtype = evaluation.torch_device, evaluation.torch_dtype
    loader = PairLoader(sources)
    numels = {name: p.numel() for name, p in model.named_parameters() if analysed is None or name in analysed}
    with prepared(model, batches, loss, evaluation, buffers=buffers) as objective, streamed(model, loader):
        chosen, totals, _ = objective.derivatives({}, {}, "taylor", fallback=False)

        def value(point: Point) -> Tensor:
            loader.point = point
            return objective.value({})

        value_t1 = value(1.0) if loss_t1 is None else torch.tensor(loss_t1, dtype=torch.float64, device=device)
        update_sq = loader.squared_norms()
        result = summarize_rows(totals, value_t1, numels, [[update_sq[n] for n in numels]], objective.num_examples,
                                dtype, device, chosen)
        require_finite(result, batches)
        result.num_tokens = objective.num_tokens
        if critical_tol is not None:
            result.critical = critical_search(lambda a: float(value(a)), critical_tol)
    result.streamed = True
    return result
