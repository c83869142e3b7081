"""The pair analysis of a model larger than memory: Taylor mode with its parameters streamed.

The model is a skeleton (``models.skeleton``: parameters on the meta device); each parameter of w_t and
w_t1 is read when its module runs (``derivatives.streaming``) and released after, so the peak memory is
the Taylor activations plus a few modules' weights, not the model. The quantities are those of
``analysis.pair`` with ``method="taylor"``, the same numbers:

* f(w_t), gᵀΔ, ΔᵀHΔ: one Taylor-mode pass, each parameter entering as (w_t, Δ, 0);
* f(w_t1): one forward pass with each parameter read from w_t1;
* ‖Δ_l‖²: from each Δ_l as the Taylor pass forms it, summed over the blocks of a weight run in pieces (a
  tensor no forward forms whole is read for it alone, block by block);
* with ``critical_tol``: the critical-scale search (``analysis.critical``), one streamed forward pass per α.

No g and no HΔ, as for in-memory Taylor mode: no extras and no direction other than the update.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from zeroptim_cli.allocator import MMAP_THRESHOLD
from zeroptim_cli.analysis.critical import critical_search
from zeroptim_cli.analysis.pair import prepared, require_finite, summarize_rows
from zeroptim_cli.analysis.result import PairAnalysis
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.derivatives.streaming import Point, Rows, pair_point, row_slices, streamed
from zeroptim_cli.io.batches import Batch

#: Reads one parameter of w_t (or ``rows`` of it) on the run's device, in its dtype.
Read = Callable[..., Tensor]
#: Reads the same parameter (or rows) of w_t1, less its argument when one is given (Δ = w_t1 − w_t).
ReadLess = Callable[..., Tensor]


def squared_norm(t: Tensor, piece: int = 2**16) -> Tensor:
    """‖t‖² in float64, summed piece by piece: no temporary the size of ``t`` (an embedding's Δ is large). The
    pieces' squares (256 KiB in float32) stay in the cache and below the size from which streaming's allocator
    maps every block afresh (``allocator.return_freed_memory``): measured, a tenth of the time of pieces of 2²²."""
    return torch.stack([p.pow(2).sum(dtype=torch.float64) for p in t.reshape(-1).split(piece)]).sum()


#: Blocks of rows read for ‖Δ_l‖² alone: below the size from which streaming's allocator maps every block afresh,
#: so that each block reuses the heap memory of the one before instead of faulting in new pages.
NORM_BLOCK_BYTES = MMAP_THRESHOLD // 2


class PairLoader:
    """The parameters (or rows of them) at the current ``point`` for ``derivatives.streaming``, read from
    ``sources`` (name → (read w_t, read w_t1)) for parameters of ``shapes`` in ``dtype``; keeps ‖Δ_l‖² of
    every Δ_l it forms, whole or as blocks of rows that cover it. The parameters ``fixed`` names (frozen: their
    Δ is zero) are w_t at every point, read once per use and carried as constants."""

    def __init__(self, sources: Mapping[str, tuple[Read, ReadLess]], shapes: Mapping[str, torch.Size],
                 dtype: torch.dtype, fixed: Collection[str] = ()) -> None:
        self.sources, self.shapes, self.itemsize = sources, shapes, dtype.itemsize
        self.fixed = frozenset(fixed)
        self.point: Point = "taylor"
        self.update_sq: dict[str, Tensor] = {}
        self._blocks: dict[str, dict[tuple[int, int], Tensor]] = {}

    def __call__(self, name: str, rows: Rows = None) -> Tensor:
        read_t, read_t1 = self.sources[name]
        if name in self.fixed:
            return read_t(rows=rows)
        value, delta = pair_point(functools.partial(read_t, rows=rows),
                                  lambda minus: read_t1(minus, rows=rows), self.point)
        if delta is not None and name not in self.update_sq:
            if rows is None:
                self.update_sq[name] = squared_norm(delta)
            elif isinstance(rows, slice):
                self._block(name, rows, squared_norm(delta))
        return value

    def _block(self, name: str, rows: slice, sq: Tensor) -> None:
        """Note ‖Δ‖² of one block of rows; once the blocks cover the tensor, their sum is its ‖Δ_l‖²."""
        blocks = self._blocks.setdefault(name, {})
        blocks[(rows.start, rows.stop)] = sq
        shape = self.shapes[name]
        if sum(b - a for a, b in blocks) == (shape[0] if len(shape) else 1):
            self.update_sq[name] = torch.stack(list(blocks.values())).sum()
            del self._blocks[name]

    def squared_norms(self) -> dict[str, Tensor]:
        """‖Δ_l‖² of every parameter but the fixed ones, reading those no forward pass formed Δ_l of, block by
        block (``NORM_BLOCK_BYTES``)."""
        for name, (read_t, read_t1) in self.sources.items():
            if name not in self.update_sq and name not in self.fixed:
                shape = self.shapes[name]
                blocks = row_slices(shape, self.itemsize, NORM_BLOCK_BYTES) if len(shape) else [None]
                self.update_sq[name] = torch.stack([squared_norm(read_t1(read_t(rows=r), rows=r))
                                                    for r in blocks]).sum()
        return {name: self.update_sq[name] for name in self.sources if name not in self.fixed}


#: ``chunk_size="auto"`` when streaming: the bytes of the widest output's three Taylor coefficients per chunk.
STREAM_CHUNK_BYTES = 64 * 2**20


def streamed_chunk_length(model: nn.Module, batches: Sequence[Batch], dtype: torch.dtype) -> int:
    """Examples per chunk for ``chunk_size="auto"`` when streaming (0: whole batches). The activations cannot
    be measured as in memory (that needs the parameters resident), but where they dominate a streamed
    analysis they are those of the widest output: three Taylor coefficients of targets × out_features values
    per example (a language model's logits, 3 × T × vocabulary), which a chunk keeps under
    ``STREAM_CHUNK_BYTES``; at least one example per chunk. Exact, as every chunking; each chunk is one more
    pass over the checkpoints' files. (Train mode and a user's ``MODULE:FN`` loss keep whole batches, as in
    memory.)"""
    widest = max((m.out_features for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    per_example = max(3 * b.targets[0].numel() * widest * dtype.itemsize for b in batches)
    return max(1, STREAM_CHUNK_BYTES // per_example) if per_example else 0


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model's key/value cache off for the block (``config.use_cache``): no pass reads it, and
    streamed it would keep three Taylor coefficients of every layer's keys and values to the end of the pass."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if cached:
            config.use_cache = cached  # type: ignore[union-attr]


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
    ``chunk_size="auto"`` cuts batches as ``streamed_chunk_length`` says (measuring activations would need the
    parameters resident); a number cuts them as in memory. ``analysed`` (default: all) names the parameters the
    per-layer split is over (the trainable ones: ``analysis.trainable``; the others' Δ is zero)."""
    device, dtype = evaluation.torch_device, evaluation.torch_dtype
    chunk_size = evaluation.chunk_size
    if chunk_size == "auto":
        chunk_size = streamed_chunk_length(model, batches, dtype) if loss.known and not evaluation.train else 0
    evaluation = replace(evaluation, method="taylor", chunk_size=chunk_size)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    loader = PairLoader(sources, shapes, dtype, fixed=() if analysed is None else set(shapes) - set(analysed))
    numels = {name: shape.numel() for name, shape in shapes.items() if analysed is None or name in analysed}
    with no_cache(model), prepared(model, batches, loss, evaluation, buffers=buffers) as objective, \
            streamed(model, loader):
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
