"""The objective f(w): the model's mean loss over one or several batches, as a pure function of w.

    f(w) = Σ_b n_b · ℓ_b(w) / Σ_b n_b,   ℓ_b(w) = loss(model(x_b; w, buffers_t), y_b),

with n_b the batch's count (examples, or counted tokens for a token-level loss; ``Loss.count``) and the buffers
(BatchNorm running statistics, …) those of checkpoint t for every evaluation. In eval mode (the default)
BatchNorm uses those running statistics and dropout is off. In train mode BatchNorm uses batch statistics
and dropout draws its masks from a generator of the evaluation's own with a fixed seed, the same for every
evaluation (``randomness.seeded``: no other thread's generator is touched), so f stays one deterministic
function of w; buffers are copied per evaluation, so nothing is mutated. A float64 objective stays float64
inside the model's and the loss's own code (``precision.computed_in``). x_b is a tensor, passed as
``model(x_b)``, or keyword arguments, passed as ``model(**x_b)`` (``Batch.model_args``).

Under torchrun this is the one place that knows about ranks: each rank holds its shard of every batch
(``distributed.shard``), weighted by the global count, and every value, gradient and derivative this
class returns is already summed over the ranks, so callers see the single-process f.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call

from zeroptim_cli import distributed as dist
from zeroptim_cli.derivatives.base import Derivatives, ScalarFn, all_reduce, axpy
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.kernels import fused_attention_values
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.derivatives.methods import METHODS, chain
from zeroptim_cli.derivatives.precision import computed_in
from zeroptim_cli.derivatives.randomness import seeded
from zeroptim_cli.derivatives.refusals import Refusal
from zeroptim_cli.derivatives.structure import structure_key
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch
from zeroptim_cli.vectors import Params

#: ``chunk_size="auto"`` for a method that holds an autograd graph: each chunk saves at most about this many
#: bytes of activations for backward (``chunk_length``). Measured against whole batches and against the fastest
#: peer's HVP plus a forward (benchmarks/bench_analysis.py): 16 MiB chunks (16 of 2 sequences for the transformer
#: at 32×256, 8 of 512 rows for the wide MLP at 4096) cost 3–5 % more than whole batches; at 64 MiB (4–8
#: sequences, 2048 rows) the transformer is 3 % faster than whole batches and the wide MLP within 1 %.
AUTO_CHUNK_BYTES = 64 * 2**20
#: ``chunk_size="auto"`` for Taylor mode: the least budget of a chunk's peak (``chunk_length``). Each chunk repeats
#: the parameters' share of the work (a product's weight-side passes, its packing into the matrix kernel): on the
#: wide MLP at batch 4096, 4 chunks of 1024 rows (96 MiB) took 0.977 of the time of 6 of 683 (64 MiB) in
#: interleaved rounds, at 0.92× a step's peak memory against 0.81×.
TAYLOR_CHUNK_BYTES = 96 * 2**20
#: Taylor mode's peak per example, in multiples of the example's largest activation: three coefficients of an
#: op's input and of its output and what its rule computes on the way (measured 7.3–11: docs/scale.md).
TAYLOR_PEAK_FACTOR = 10


#: ``chunk_size="auto"``'s chunk lengths as measured, by what they depend on (``probe_key``), for the rest of the
#: process: a sweep's pairs, whose models are built alike and whose batches have the same shapes, and repeated
#: analyses of one model measure once. At most ``MEASURED_SLOTS`` kept, the least recently used dropped first.
_MEASURED: OrderedDict[tuple, int] = OrderedDict()
MEASURED_SLOTS = 64


def forget_measurements() -> None:
    """Forget the chunk lengths measured so far: the next analysis measures afresh, as a process's first does."""
    _MEASURED.clear()


def probe_key(structure: tuple | None, params: Params, batch: Batch, loss: Loss, live: bool) -> tuple | None:
    """What a chunk length measured by ``chunk_size="auto"`` depends on: the model's structure and the attention
    kernels in force (``structure``, from ``structure.structure_key``), the names, shapes, dtypes and devices of
    the parameters it is measured with and of the batch's tensors, the loss, the method's memory rule and the
    budgets. Not the values: sizes of activations follow shapes. None (nothing kept) where the structure could
    not be read."""
    if structure is None:
        return None
    return (structure, tuple((k, v.shape, v.dtype, v.device) for k, v in params.items()),
            tuple((k, t.shape, t.dtype, t.device) for k, t in batch.tensors().items()), loss.name, live,
            AUTO_CHUNK_BYTES, TAYLOR_CHUNK_BYTES, TAYLOR_PEAK_FACTOR)


def chunk_length(n: int, chunk_size: int | str | None, per_example: float = 0.0, budget: float | None = None) -> int:
    """Examples per chunk of a batch of ``n``: ``chunk_size`` itself (0 or None: the whole batch), or for
    ``"auto"`` n/k with k = ⌈n·b / B⌉, b the bytes one example holds at the chunk's peak (``per_example``)
    and B the ``budget`` (default ``AUTO_CHUNK_BYTES``). The objective takes, by the method's memory (``methods.Method.live_memory``):

    - for a method that holds an autograd graph (a Hessian-vector product keeps about three times a step's
      saved activations): b = S, what a training step saves per example (``activation_bytes``), and
      B = ``AUTO_CHUNK_BYTES`` (64 MiB);
    - for Taylor mode, which holds no graph, only three coefficients of the activations live at one time:
      b = 10·L, L the example's largest activation (``largest_activation``), and B = max(n·S/2, 96 MiB), half
      of what a training step on the whole batch saves. A chunk's peak then stays under a step's activations
      (the half leaves room for the estimate 10·L and for attention kernels that save less than the math
      kernel S is measured with), and a batch is cut only where one example's Taylor peak exceeds half
      what a step saves for it, as a transformer's attention maps do at long context, into few chunks: each
      chunk repeats the Python dispatch of every op and the parameters' share of the work. Under 96 MiB
      chunks would save less memory than torch's own take and still cost their dispatch.

    Where activations dominate memory chunks bring the peak near or under one step's; where the parameters
    dominate, or the batch is small, they would only add overhead, and the batch stays whole."""
    if chunk_size == "auto":
        chunks = max(1, math.ceil(n * per_example / (AUTO_CHUNK_BYTES if budget is None else budget)))
        return -(-n // min(chunks, n))
    return int(chunk_size) if chunk_size else n


def saved_tensors(fn: Callable[[Batch], ScalarFn], batch: Batch, params: Params) -> list[tuple[int, bool]]:
    """(bytes, whether it is a parameter's own storage) of each tensor autograd saves for backward when
    ``fn(batch)`` is evaluated at ``params``, each once (a tensor saved by two ops is held once). The graph
    keeps nothing (backward never runs) and the tensors are held here until the evaluation ends, so that no
    data pointer is reused meanwhile, then let go: a saved tensor that stays reachable from the graph (the
    graph holds the hooks) holds its own node, a cycle through torch that no garbage collection sees, which
    kept every probe's whole graph alive (25 MiB a 2-example probe of a transformer at 256 tokens)."""
    seen: dict[tuple[int, int], int] = {}
    held: list[Tensor] = []

    def pack(t: Tensor) -> None:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        held.append(t)

    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            fn(batch)(leaves)
    finally:
        held.clear()
    own = {v.data_ptr() for v in leaves.values()}
    return [(size, ptr in own) for (ptr, _), size in seen.items()]


def activation_bytes(fn: Callable[[Batch], ScalarFn], batch: Batch, params: Params, bound: float | None = None,
                     one: list[tuple[int, bool]] | None = None) -> float:
    """S, the bytes per example that autograd saves for backward when ``fn(batch)`` is evaluated: the
    difference between a 2-example and a 1-example slice of ``batch`` (what the parameters themselves add
    cancels). With ``bound``, a batch whose n examples would save at most ``bound`` bytes even at the 1-example
    slice's whole saved bytes each (the parameters' share counted too: an upper bound) gets that upper bound,
    without the second slice's evaluation (a small model's pair then pays one probe, not two). ``one``: the
    1-example slice's ``saved_tensors`` when already taken."""
    first = sum(size for size, _ in (saved_tensors(fn, batch.head(1), params) if one is None else one))
    if bound is not None and batch.num_examples * first <= bound:
        return float(first)
    return float(max(0, sum(size for size, _ in saved_tensors(fn, batch.head(2), params)) - first))


def largest_activation(one: list[tuple[int, bool]]) -> float:
    """L, the bytes of the largest activation of one example, from the 1-example slice's ``saved_tensors``:
    the largest saved tensor that is no parameter's own storage (one computed from a parameter, such as a
    converted copy, counts: L can only be overestimated, which gives smaller chunks)."""
    return float(max((size for size, own in one if not own), default=0))


class Reparametrized:
    """``torch.func.functional_call(model, (params, buffers), args, kwargs)`` with the walk of the model it does
    on every call (every name of every parameter and buffer, tied ones included) done once, at construction:
    each name is mapped to the places it lives in (a module's ``_parameters`` or ``_buffers`` and the key
    there), a tied tensor's names to all of them, so that a tensor given for one name replaces the tied
    ones too. The tensors are put there for the call and the model's own put back after, as
    ``functional_call`` does (on a small model its walk costs about as much as the forward pass). Names the
    model lacks, or two different tensors given for tied names, are left to ``functional_call`` itself."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        places: dict[int, list[tuple[dict, str]]] = {}  # by the tensor's identity: where it lives
        named: list[tuple[str, int]] = []
        for prefix, module in model.named_modules(remove_duplicate=False):
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None:
                        places.setdefault(id(t), []).append((store, key))
                        named.append((f"{prefix}.{key}" if prefix else key, id(t)))
        #: name → (its tensor's group, every place of that tensor)
        self.places = {name: (group, places[group]) for name, group in named}

    def __call__(self, params: Params, buffers: Mapping[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        swapped: list[tuple[dict, str, Tensor]] = []
        given: dict[int, Tensor] = {}
        for tensors in (params, buffers):
            for name, t in tensors.items():
                entry = self.places.get(name)
                if entry is None or given.setdefault(entry[0], t) is not t:
                    for store, key, own in reversed(swapped):
                        store[key] = own
                    return functional_call(self.model, (dict(params), dict(buffers)), args, kwargs)
                for store, key in entry[1]:
                    swapped.append((store, key, store[key]))
                    store[key] = t
        try:
            return self.model(*args, **kwargs)
        finally:
            for store, key, own in reversed(swapped):
                store[key] = own


@dataclass(frozen=True)
class BatchTerm:
    """One batch's share of f: ``weight`` = n_b / Σ n_b and ``fn`` = ℓ_b as a function of the parameters."""

    batch: Batch
    weight: float
    fn: ScalarFn


class Objective:
    """f(w) over ``batches`` for ``model`` with fixed ``buffers``, evaluated as ``evaluation`` says; see the
    module docstring.

    The batches are this rank's shards of the given ones, moved to the evaluation's device (floating tensors
    in its dtype), and cut into chunks (``chunk_length``), for each method by the rule of its memory
    (``terms_for``: Taylor mode's chunks are larger). f is a mean over examples (or counted tokens), so
    Σ_chunks (n_c/N)·ℓ_c is the same f exactly, and so are its derivatives; only the peak memory of one
    evaluation shrinks (eval mode only: train mode's batch statistics and dropout masks would differ). The
    model must already be on that device and dtype, in the mode it is evaluated in.

    Args:
        model: the model, already on the evaluation's device and in its dtype; its parameters are replaced by w
            at each call.
        buffers: the buffers held fixed (name → tensor; ``{}`` for a model without any).
        batches: the batches f averages over, weighted by their counted targets (``Loss.count``).
        loss: the per-batch loss (``derivatives.losses``).
        evaluation: ``derivatives.evaluation.Evaluation``: its ``train`` mode and ``seed`` (the same masks at
            every evaluation), ``device`` and ``dtype`` (where the batches go, and the dtype of their floating
            tensors), ``chunk_size`` (``auto``, N examples per evaluation, or 0 or None for whole batches), and
            the ``method`` that ``derivatives`` runs unless told another.
        params: the parameters ``chunk_size="auto"`` measures the activations with (default: the model's own);
            pass them for a model whose own are on the meta device (``models.skeleton``).

    The methods take parameters w (and a direction v) as dicts name → tensor: ``value(w)`` is f(w),
    ``gradient(w)`` is ∇f(w), ``derivatives(w, v, method)`` is (the method that ran, ``Derivatives``: f(w),
    ∇f(w)ᵀv, vᵀ∇²f(w)v and, where the method gives them, g and Hv; the notes on fallbacks).

    Example (f(w) = mean((x·w)²) = (w₁² + w₂²)/2 on x = I, y = 0: ∇f = w, ∇²f = I):

    >>> import torch
    >>> from torch import nn
    >>> from zeroptim_cli.derivatives import Evaluation, Objective
    >>> from zeroptim_cli.derivatives.losses import resolve_loss
    >>> from zeroptim_cli.io.batches import Batch
    >>> model = nn.Linear(2, 1, bias=False).double()
    >>> batch = Batch(torch.eye(2), torch.zeros(2, 1))
    >>> f = Objective(model, {}, [batch], resolve_loss("mse"), Evaluation(dtype=torch.float64))
    >>> w = {"weight": torch.tensor([[1.0, 2.0]], dtype=torch.float64)}
    >>> round(f.value(w).item(), 12), f.gradient(w)["weight"].tolist()
    (2.5, [[1.0, 2.0]])
    >>> method, d, notes = f.derivatives(w, {"weight": torch.tensor([[-0.5, -0.5]], dtype=torch.float64)}, "taylor")
    >>> method, round(d.grad_corr.item(), 12), round(d.dir_sharpness.item(), 12), notes
    ('taylor', -1.5, 0.5, [])
    """

    def __init__(self, model: nn.Module, buffers: Mapping[str, Tensor], batches: Sequence[Batch], loss: Loss,
                 evaluation: Evaluation = Evaluation(), *, params: Params | None = None) -> None:
        chunk_size = evaluation.chunk_size
        if isinstance(chunk_size, int) and chunk_size > 0 and evaluation.train:
            raise ConfigError("--chunk-size needs eval mode: in train mode batch statistics and dropout masks "
                              "depend on the whole batch, so its chunks would give another f")
        self.model, self.buffers, self.loss, self.evaluation = model, dict(buffers), loss, evaluation
        self.device, self.dtype = evaluation.torch_device, evaluation.torch_dtype
        self._probe = params
        self._call = Reparametrized(model)

        def prepare() -> list[Batch]:
            for b in batches:
                loss.validate(b)
            return [b.to(self.device, self.dtype) for b in dist.shard(batches)[0]]

        self._local = dist.guarded(prepare)
        self._counts = counts = [loss.count(b.targets) for b in self._local]
        self._total, examples = self._sum([float(sum(counts)), float(sum(b.num_examples for b in self._local))])
        self.num_examples = int(examples)
        #: the counted tokens of all batches, for a token-level loss (else None)
        self.num_tokens = int(self._total) if all(loss.per_token(b.targets) for b in self._local) else None
        dist.guarded(lambda: self._check_counts(counts))
        self._chunked: dict[bool, list[BatchTerm]] = {}
        #: the batch terms (chunks) that the evaluation's own method runs on (``terms_for``)
        self.terms = dist.guarded(lambda: self.terms_for(evaluation.method))

    def terms_for(self, method: str) -> list[BatchTerm]:
        """The batch terms ``method`` (``auto`` or a name of ``METHODS``) runs on: the batches cut into chunks
        for that method's memory (``chunk_length``, ``methods.Method.live_memory``). A method tried after
        another refused gets its own chunks: Taylor mode's larger ones would be too large for the
        Hessian-vector product it falls back to."""
        return self._terms(METHODS[chain(method)[0]].live_memory)

    def _terms(self, live: bool) -> list[BatchTerm]:
        """The batch terms for a method whose memory is the activations live at one time (``live``) or those a
        step saves, cut once for each and kept (the same chunks for both unless ``chunk_size`` is ``auto``)."""
        live = live and self.evaluation.chunk_size == "auto"
        if live not in self._chunked:
            counted = []
            for b, n in zip(self._local, self._counts):
                chunks = b.chunks(self._chunk_length(b, self.evaluation.chunk_size, live))
                counted += [(chunks[0], n)] if len(chunks) == 1 else [(c, self.loss.count(c.targets)) for c in chunks]
            # a chunk without a counted target adds nothing to f (and its mean would be 0/0)
            self._chunked[live] = [BatchTerm(c, n / self._total, self._batch_fn(c, i))
                                   for i, (c, n) in enumerate(counted) if n > 0]
        return self._chunked[live]

    def _chunk_length(self, batch: Batch, chunk_size: int | str | None, live: bool) -> int:
        """``chunk_length`` for ``batch``, by the rule for a method whose memory is the activations live at one
        time (``live``: Taylor mode) or those a step saves; ``auto`` measures the activations once for each model
        structure and batch shape in a process (``probe_key``; a batch that does not fit the model stays whole
        here, so that its evaluation reports the error, and is measured again next time), and keeps batches
        whole for a user's ``MODULE:FN`` loss, whose averaging zeroptim cannot know (``--chunk-size N`` still
        cuts them, assuming a mean over examples, as several batches are averaged)."""
        n = batch.num_examples
        if chunk_size == "auto" and not self.loss.known:
            return n  # a user's loss may average over something else than examples: chunks could change f
        if chunk_size != "auto" or self.evaluation.train or n < 2:
            return chunk_length(n, 0 if chunk_size == "auto" else chunk_size)
        params = dict(self.model.named_parameters()) if self._probe is None else self._probe
        key = probe_key(self._structure, params, batch, self.loss, live)
        if key in _MEASURED:
            _MEASURED.move_to_end(key)
            return _MEASURED[key]
        try:
            length = self._measured_length(batch, params, live)
        except Exception:  # noqa: BLE001 - the real evaluation raises it with the batch named; nothing is kept
            return n
        if key is not None:
            _MEASURED[key] = length
            while len(_MEASURED) > MEASURED_SLOTS:
                _MEASURED.popitem(last=False)
        return length

    @functools.cached_property
    def _structure(self) -> tuple | None:
        """The model's ``structure_key``, read once per objective: every batch and rule shares it."""
        return structure_key(self.model)

    def _measured_length(self, batch: Batch, params: Params, live: bool) -> int:
        """``chunk_length`` of ``batch`` by the rule of ``live``, from the activations measured at ``params``."""
        n, fn = batch.num_examples, lambda part: self._batch_fn(part, 0)
        if not live:
            return chunk_length(n, "auto", activation_bytes(fn, batch, params, AUTO_CHUNK_BYTES))
        one = saved_tensors(fn, batch.head(1), params)
        peak = TAYLOR_PEAK_FACTOR * largest_activation(one)
        if n * peak <= TAYLOR_CHUNK_BYTES:
            return n  # under the least budget whatever a step saves: no second probe
        step = n * activation_bytes(fn, batch, params, one=one)
        return chunk_length(n, "auto", peak, max(step / 2, TAYLOR_CHUNK_BYTES))

    @staticmethod
    def _check_counts(counts: list[int]) -> None:
        """Only under torchrun can a rank be left with nothing to do: every batch has a counted target
        (``Loss.validate``), but a rank's shards of them may not."""
        if not any(n > 0 for n in counts):
            raise ZeroptimError(f"rank {dist.rank()}: its shards of the batches hold no counted target; use fewer ranks")

    def _sum(self, values: list[float]) -> list[float]:
        """Σ over ranks of a few numbers, in float64."""
        return dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def _batch_fn(self, batch: Batch, index: int) -> ScalarFn:
        """f on ``batch`` alone, a closure over what it uses and not over the objective, which keeps it in its
        terms: such a cycle would hold the objective's tensors until Python's cyclic collector next runs."""
        args, kwargs = batch.model_args()
        call, fixed, loss, dtype, evaluation = self._call, self.buffers, self.loss, self.dtype, self.evaluation

        def fn(params: Params) -> Tensor:
            with computed_in(dtype):
                if not evaluation.train:
                    return loss(call(params, fixed, args, kwargs), batch.targets)
                buffers = {k: v.clone() for k, v in fixed.items()}
                with seeded(evaluation.seed + index):
                    outputs = call(params, buffers, args, kwargs)
                return loss(outputs, batch.targets)

        return fn

    def value(self, w: Params) -> Tensor:
        """f(w), with no graph (attention by SDPA's fused CPU kernel: ``kernels.fused_attention_values``)."""
        with torch.no_grad(), fused_attention_values():
            local = dist.guarded(lambda: sum(t.weight * t.fn(w) for t in self.terms))
        return dist.all_reduce_sum(torch.as_tensor(local, device=self.device))

    def gradient(self, w: Params) -> Params:
        """g = ∇f(w), one backward pass per batch."""

        def local() -> Params:
            leaves = {k: v.detach().requires_grad_() for k, v in w.items()}
            total = {k: torch.zeros_like(v) for k, v in w.items()}
            with torch.enable_grad():
                for term in self._terms(False):
                    grads = torch.autograd.grad(term.fn(leaves), list(leaves.values()), materialize_grads=True)
                    for k, g in zip(leaves, grads):
                        total[k] += term.weight * g
            return total

        g = dist.guarded(local)
        zero = torch.zeros((), dtype=next(iter(g.values())).dtype, device=self.device)
        return all_reduce(Derivatives(zero, zero, zero, g)).grad  # type: ignore[return-value]

    def derivatives(self, w: Params, v: Params, method: str | None = None, *, need_hvp: bool = False,
                    fallback: bool = True, w1: Callable[[], Params] | None = None) -> tuple[str, Derivatives, list[str]]:
        """(the method that ran, Σ_b weight_b × each batch's derivatives along ``v``, notes on fallbacks).

        The methods of ``methods.chain(method)`` (None: the evaluation's method; with ``need_hvp``, only those that give HΔ; with
        ``fallback=False``, ``method`` alone) are tried in turn. ``w1`` (a function giving w + v) lets a method that
        can (``Method.value_at_w1``) take f(w + v) on each batch term too, in the result's ``loss_t1`` (None unless
        it did so on every term, and always without torchrun: ``base.all_reduce``). A method's declared refusal
        (``refusals.Refusal``) on any batch of any rank moves every rank on to the next one together, so that
        all ranks sum the same method's numbers, and is noted. Any other exception is an error: the batch's,
        if the plain forward pass fails on it too, else the method's. When every method refuses, the error
        names each one's reason.
        """
        method = method or self.evaluation.method
        names = [n for n in (chain(method) if fallback else (method,)) if not need_hvp or METHODS[n].gives_hvp]
        notes: list[str] = []
        refused: list[str] = []
        w1 = None if dist.active() else w1
        for i, name in enumerate(names):
            total, refusal = dist.guarded(functools.partial(self._attempt, name, w, v, w1))
            reasons = [r for r in dist.all_gather(refusal) if r]
            if not reasons:
                assert total is not None
                return name, all_reduce(total), notes
            refused.append(f"{name}: {reasons[0]}")
            if i + 1 < len(names):
                notes.append(f"{name} refused this model ({reasons[0]}); {names[i + 1]} ran instead")
        sources = ", ".join(f"'{t.batch.source}'" for t in self.terms[:3])
        raise ZeroptimError(f"no exact method could differentiate the loss on batch {sources} twice along Δ "
                            f"({'; '.join(refused)})")

    def _attempt(self, name: str, w: Params, v: Params,
                 w1: Callable[[], Params] | None) -> tuple[Derivatives | None, str | None]:
        """(Σ_b weight_b × method ``name``'s derivatives on this rank, None) or (None, its refusal); f(w1) summed
        only where every term gave it, and asked of none after one that did not."""
        total: Derivatives | None = None
        for term in self.terms_for(name):
            try:
                d = METHODS[name](term.fn, w, v, w1)
            except Refusal as exc:
                return None, str(exc)
            except Exception as exc:  # noqa: BLE001 - classified and re-raised
                raise self._failure(term, w, name, exc) from exc
            if d.loss_t1 is None:
                w1 = None  # the sum will not be whole: no later term need take f(w1)
            total = axpy(term.weight, d, total)
        if total is not None and w1 is None:
            total = replace(total, loss_t1=None)
        return total, None

    def _failure(self, term: BatchTerm, w: Params, method: str, exc: Exception) -> ZeroptimError:
        """The error for ``exc``, raised by ``method`` on ``term`` at ``w``: the batch's if the plain forward
        pass fails too (the batch does not fit the model), else the method's own (a fault of zeroptim or of
        torch: ``--debug`` shows its traceback)."""
        if isinstance(exc, ZeroptimError):
            return ZeroptimError(f"batch '{term.batch.source}': {exc}")
        try:
            with torch.no_grad():
                term.fn(w)
        except Exception as forward:  # noqa: BLE001 - reported as the batch's error
            return _batch_error(term.batch, forward)
        first = (str(exc).strip().splitlines() or [""])[0]
        return ZeroptimError(f"--method {method} failed on batch '{term.batch.source}' ({type(exc).__name__}: "
                             f"{first}) although the model's forward pass runs on it: a fault in zeroptim or in "
                             "torch, not in the batch (rerun with --debug for the traceback)")


def _batch_error(batch: Batch, exc: Exception) -> ZeroptimError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ZeroptimError(f"batch '{batch.source}' does not fit the model ({type(exc).__name__}: {first})")
