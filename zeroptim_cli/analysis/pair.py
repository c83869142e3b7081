"""The pair analysis: the second-order Taylor decomposition of one optimizer step.

With Δ = w_{t+1} − w_t, g = ∇f(w_t) and H = ∇²f(w_t) (Pan & Li 2023, arXiv 2306.00204):

    f(w_{t+1}) − f(w_t) = gᵀΔ + ½ ΔᵀHΔ + residual,   residual = O(‖Δ‖³).

Per parameter tensor l: g_lᵀΔ_l and Δ_lᵀ(HΔ)_l, which sum to the totals. The derived quantities are in
``result``. A pair is analysed in four steps, read top to bottom in ``analyze_pair``: prepare (parameters,
buffers and batches on the device, the objective f), differentiate (one call into ``derivatives``),
summarize (one host transfer), extras.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from zeroptim_cli.analysis.critical import critical_search
from zeroptim_cli.analysis.directions import Direction
from zeroptim_cli.analysis.extras import Extras, compute_extras
from zeroptim_cli.analysis.result import LayerStats, PairAnalysis
from zeroptim_cli.derivatives import Derivatives, Evaluation, Objective, methods
from zeroptim_cli.derivatives.base import LazyParams
from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch
from zeroptim_cli.models.hf import with_decoder_inputs
from zeroptim_cli.vectors import Params


def analyze_pair(
    model: nn.Module,
    params_t: Mapping[str, Tensor],
    params_t1: Mapping[str, Tensor],
    batches: Sequence[Batch],
    loss: Loss,
    evaluation: Evaluation = Evaluation(),
    *,
    buffers: Mapping[str, Tensor] | None = None,
    loss_t1: float | None = None,
    direction: Direction | None = None,
    direction_name: str = "update",
    extras: Extras | None = None,
    critical_tol: float | None = None,
    **overrides: Any,
) -> PairAnalysis:
    """Decompose the loss change of the step from ``params_t`` to ``params_t1`` on ``batches``: f(w_t),
    f(w_t1), gᵀΔ, ΔᵀHΔ and every quantity derived from them (``analysis.result``), for Δ = w_t1 − w_t.

    The model is moved to the evaluation's device and dtype and stays there afterwards (it is not moved
    back); it is evaluated in eval mode (train mode with ``train=True``), and its own mode is restored
    afterwards.

    Args:
        model: the model; f(w) is ``loss`` of ``model`` with parameters w, averaged over ``batches``.
        params_t, params_t1: the two points, parameter name (as in ``model.named_parameters()``) → tensor.
        batches: the batches f averages over (``io.batches.Batch``).
        loss: the per-batch loss and its averaging count (``derivatives.losses.resolve_loss``).
        evaluation: how f is evaluated and differentiated (``derivatives.Evaluation``, passed whole down to
            the objective): ``method``, ``auto`` or one of ``zeroptim_cli.derivatives.METHODS`` (where it
            refuses, its fallbacks run, as the result's ``warnings`` say); ``train`` and ``seed``, train mode
            (dropout masks and batch statistics) and the seed of its random ops; ``device`` and ``dtype``,
            where and in which precision to compute; ``chunk_size``, the examples of one evaluation
            (``derivatives.objective.chunk_length``): the same numbers, less peak memory.
        buffers: held fixed at these values (default: the model's own, i.e. checkpoint t's).
        loss_t1: f(w_t1) on the same batches when already known (e.g. f(w_t) of a sweep's next pair): saves
            its forward pass.
        direction, direction_name: another direction d from w_t, computed from g and Δ
            (``analysis.directions``), replacing Δ: every quantity is then that of d, with f(w_t1) read as
            f(w_t + d).
        extras: the opt-in analyses of ``analysis.extras``, under their own keys.
        critical_tol: None to skip, else the relative tolerance of the forward-only critical-scale search
            along Δ (``analysis.critical``).
        overrides: fields of ``evaluation`` to replace, by name (``method="taylor", dtype=torch.float64``).

    Returns:
        The ``PairAnalysis``; ``to_dict()`` gives the JSON object of docs/contract.md.

    Example (f(w) = mean((x·w)²) = (w₁² + w₂²)/2 on x = I, y = 0, quadratic, so gᵀΔ + ½ΔᵀHΔ is exact):

    >>> import torch
    >>> from torch import nn
    >>> from zeroptim_cli import Batch, analyze_pair, resolve_loss
    >>> model = nn.Linear(2, 1, bias=False)
    >>> w_t, w_t1 = {"weight": torch.tensor([[1.0, 2.0]])}, {"weight": torch.tensor([[0.5, 1.5]])}
    >>> result = analyze_pair(model, w_t, w_t1, [Batch(torch.eye(2), torch.zeros(2, 1))], resolve_loss("mse"),
    ...                       dtype=torch.float64)
    >>> d = result.to_dict()
    >>> keys = "delta_loss", "grad_corr", "dir_sharpness", "taylor_pred", "dir_sharpness_normalized"
    >>> [round(d[k], 9) for k in keys]
    [-1.25, -1.5, 0.5, -1.25, 1.0]
    >>> next(model.parameters()).dtype  # the model stays in the analysis dtype
    torch.float64
    """
    evaluation = replace(evaluation, **overrides) if overrides else evaluation
    method = evaluation.method
    if extras is not None and extras.concentration and not methods.first(method).gives_hvp:
        raise ConfigError(f"--concentration needs HΔ coordinate by coordinate, which --method {method} does not "
                          "compute; use --method auto")
    device, dtype = evaluation.torch_device, evaluation.torch_dtype
    w_t = cast(params_t, device, dtype)
    delta = difference(params_t1, w_t)
    with prepared(model, batches, loss, evaluation, buffers=buffers, params=w_t) as objective:
        if direction is not None:
            delta, loss_t1 = direction(objective.gradient(w_t), w_t, delta), None
        w_t1 = LazyParams(lambda: cast(params_t1, device, dtype) if direction is None
                          else {k: w_t[k] + delta[k] for k in w_t})
        # Taylor mode may take f(w_t1) beside each chunk's derivatives, for less than a forward pass of its own
        chosen, totals, notes = objective.derivatives(w_t, delta, w1=w_t1 if loss_t1 is None else None)
        rows, numels = summary_rows(totals, delta), {n: t.numel() for n, t in delta.items()}
        if direction is None and loss_t1 is None and critical_tol is None and not (extras is not None and extras.any):
            # nothing after f(w_t1) needs Δ, g or HΔ: release them before w_t1 is converted to evaluate it (unless
            # Taylor mode took f(w_t1) already, chunk by chunk, with w_t1 converted beside Δ)
            delta, totals = {}, replace(totals, grad=None, hvp=None)
        if loss_t1 is not None:
            value_t1 = torch.tensor(loss_t1, dtype=torch.float64, device=device)
        else:
            value_t1 = objective.value(w_t1()) if totals.loss_t1 is None else totals.loss_t1
        w_t1.forget()
        result = summarize_rows(totals, value_t1, numels, rows, objective.num_examples, dtype, device, chosen)
        require_finite(result, batches)
        result.num_tokens = objective.num_tokens
        result.warnings = notes
        if extras is not None and extras.any:
            result.extras = compute_extras(objective, w_t, delta, totals, result, extras)
        if critical_tol is not None:
            result.critical = critical_search(
                lambda a: float(objective.value({k: w_t[k] + a * delta[k] for k in w_t})), critical_tol)
    result.direction = direction_name
    return result


def cast(tensors: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype) -> Params:
    """Floating tensors on ``device`` in ``dtype``, others on ``device`` only."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}


def difference(params_t1: Mapping[str, Tensor], w_t: Params) -> Params:
    """Δ = w_t1 − w_t, tensor by tensor: each stored tensor of t1 converted to w_t's device and dtype only for
    its own subtraction, so no converted copy of the whole w_t1 is ever held beside w_t and Δ."""
    return {k: params_t1[k].to(device=w.device, dtype=w.dtype) - w for k, w in w_t.items()}


@contextlib.contextmanager
def prepared(model: nn.Module, batches: Sequence[Batch], loss: Loss, evaluation: Evaluation, *,
             buffers: Mapping[str, Tensor] | None, params: Params | None = None) -> Iterator[Objective]:
    """Prepare: check the evaluation's method, move the model to its device and dtype, and yield the
    objective f on ``batches`` with ``buffers`` (default: the model's own) fixed (``params``: the parameters
    ``chunk_size="auto"`` measures activations with, needed when the model is a skeleton); for the block the
    model is in train or eval mode (its own mode restored after) and attention uses twice-differentiable
    kernels. An
    encoder-decoder's batches get the decoder inputs it would make from their labels (``with_decoder_inputs``)."""
    record = methods.first(evaluation.method)  # an unknown name is a usage error
    if not batches:
        raise ConfigError("no batch to evaluate the loss on")
    batches = [with_decoder_inputs(model, b) for b in batches]  # an encoder-decoder's, from the labels
    if record.check is not None:
        record.check(model, evaluation.train)
    device, dtype = evaluation.torch_device, evaluation.torch_dtype
    place(model, device, dtype)
    fixed = cast(buffers if buffers is not None else dict(model.named_buffers()), device, dtype)
    was_training = model.training
    switch = any(m.training != evaluation.train for m in model.modules())  # each train() call walks the model
    if switch:
        model.train(evaluation.train)
    try:
        with twice_differentiable_kernels():  # before the objective: its chunking measures these kernels
            yield Objective(model, fixed, batches, loss, evaluation, params=params)
    finally:
        if switch:
            model.train(was_training)


def place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model.to(device, dtype)``; a skeleton's parameters (``models.skeleton``: on the meta device, streamed
    module by module) stay on the meta device, in ``dtype``. A model already there is left as it is (``to``
    would visit every tensor again)."""
    if all(t.device == device and (t.dtype == dtype or not (t.is_floating_point() or t.is_complex()))
           for t in itertools.chain(model.parameters(), model.buffers())):
        return
    if not any(p.is_meta for p in model.parameters()):
        model.to(device=device, dtype=dtype)
        return
    model._apply(lambda t: t.to(device="meta" if t.is_meta else device,
                                dtype=dtype if t.is_floating_point() else t.dtype))


def require_finite(result: PairAnalysis, batches: Sequence[Batch]) -> None:
    """f(w_t), gᵀΔ and ΔᵀHΔ must be numbers: a NaN or infinite loss at w_t is bad data, not a result.
    (f(w_t1) may be infinite: a step that diverged is a finding; it is reported as null.)"""
    for key in ("loss_t", "grad_corr", "dir_sharpness"):
        value = getattr(result, key)
        if not math.isfinite(value):
            sources = ", ".join(f"'{b.source}'" for b in batches)
            raise ZeroptimError(f"{key} is {value} at w_t on batch {sources}: the loss or its derivatives are not "
                                "finite there (check the loss and the targets)")


def summary_rows(d: Derivatives, delta: Params) -> list[list[Tensor]]:
    """Per tensor, on the device: ‖Δ_l‖², and with g and HΔ also g_lᵀΔ_l, Δ_lᵀ(HΔ)_l and ‖g_l‖²."""
    names = list(delta)
    rows = [[delta[n].pow(2).sum() for n in names]]
    if d.grad is not None and d.hvp is not None:
        rows += [[(d.grad[n] * delta[n]).sum() for n in names], [(delta[n] * d.hvp[n]).sum() for n in names],
                 [d.grad[n].pow(2).sum() for n in names]]
    return rows


def summarize_rows(d: Derivatives, loss_t1: Tensor, numels: dict[str, int], rows: list[list[Tensor]],
                   num_examples: int, dtype: torch.dtype, device: torch.device, method: str) -> PairAnalysis:
    """The measured quantities, per tensor and in total, in one host transfer, from the per-tensor rows
    (``summary_rows``) of the tensors ``numels`` names, in that order; totals summed in float64 from the
    per-tensor parts (``math.fsum``), so that the split adds up exactly."""
    names = list(numels)
    table = torch.stack([torch.stack(r) for r in rows]).double().cpu().tolist()
    scalars = torch.stack([t.double() for t in (d.loss, loss_t1, d.grad_corr, d.dir_sharpness)]).cpu().tolist()
    exact = len(table) > 1
    layers = [
        LayerStats(name=n, numel=numels[n], update_norm=math.sqrt(table[0][i]),
                   grad_corr=table[1][i] if exact else None, dir_sharpness=table[2][i] if exact else None)
        for i, n in enumerate(names)
    ]
    return PairAnalysis(
        loss_t=scalars[0],
        loss_t1=scalars[1],
        grad_corr=math.fsum(table[1]) if exact else scalars[2],
        dir_sharpness=math.fsum(table[2]) if exact else scalars[3],
        update_norm=math.sqrt(math.fsum(table[0])),
        grad_norm=math.sqrt(math.fsum(table[3])) if exact else None,
        num_examples=num_examples,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        method=method,
        per_layer=layers,
    )
