"""Comparing directions at one point: from w_t, on the same batches, the steps of several optimizers
(``analysis.optimizer_steps``) side by side with the realized update Δ — the paper's central comparison
(Pan & Li 2023, arXiv 2306.00204).

One gradient g = ∇f(w_t) builds every direction; then per direction d, one call of
``Objective.derivatives(w_t, d, method)`` (one Hessian-vector product per batch, or whatever ``method``
costs) and one forward pass give

    gᵀd,   dᵀHd,   dᵀHd/‖d‖²,   ‖d‖,   taylor_pred = gᵀd + ½dᵀHd,   loss_after = f(w_t + d) (computed),
    cos(d, Δ) = dᵀΔ/(‖d‖‖Δ‖),   cos(g, d),   and optionally the best α of f(w_t + αd) on a grid.

Scaling: ``update`` (default) rescales every direction to the reference length ‖Δ‖ — without CKPT_T1 to
the length of the recorded optimizer's own step when its state is saved, else to ‖lr·g‖ (``sgd``) — so
that the directions differ only in where they point; ``own`` keeps each at its own optimizer's length
(those without one, e.g. ``sgd`` with no recorded lr, are still rescaled; each says which in ``scale``).
The update itself is never rescaled, and its loss_after is f(w_t1) as ``analyze`` computes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from zeroptim_cli.analysis.checkpoints import Settings, batches_for, in_memory_bytes, prepare_pair
from zeroptim_cli.analysis.extras import line_search
from zeroptim_cli.analysis.optimizer_steps import (
    MezoSettings,
    OptimizerState,
    StepPoint,
    missing_state_warnings,
    other_state,
    own_step,
    parse_names,
    recorded_state,
)
from zeroptim_cli.analysis.pair import cast, difference, prepared
from zeroptim_cli.analysis.result import cosine, quadratic_model
from zeroptim_cli.analysis.sanity import pair_warnings
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch
from zeroptim_cli.io.checkpoint import Checkpoint, load_checkpoint
from zeroptim_cli.io.lazy import open_lazily
from zeroptim_cli.vectors import Params, dot, norm

SCALES = ("update", "own")


@dataclass(frozen=True)
class CompareOptions:
    """Which directions (None: every one at hand, see ``optimizer_steps.default_names``), how to scale
    them, the clipping fraction of ``+clip``, MeZO's settings, other optimizer states (``--state``) and
    the line-search grid (None: no line search)."""

    directions: tuple[str, ...] | None = None
    scale: str = "update"
    clip_fraction: float = 0.1
    mezo: MezoSettings = MezoSettings()
    states: tuple[str, ...] = ()
    line_search: tuple[float, ...] | None = None


@dataclass
class Comparison:
    """The directions compared at w_t; ``to_dict`` gives the contract's object."""

    loss_t: float
    grad_norm: float
    num_examples: int
    dtype: str
    device: str
    method: str
    scale: str
    reference: str | None
    reference_norm: float | None
    clip_fraction: float
    directions: list[dict[str, Any]]
    step_t: int | None = None
    step_t1: int | None = None
    warnings: list[str] = field(default_factory=list)
    #: which parameters were analysed when frozen ones were left out (``analysis.trainable.subset_keys``)
    subset: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {**out, **out.pop("subset")}


def compare_directions(model: nn.Module, params_t: Mapping[str, Tensor], params_t1: Mapping[str, Tensor] | None,
                       batches: Sequence[Batch], loss: Loss, evaluation: Evaluation = Evaluation(), *,
                       lr: float | None = None, recorded: OptimizerState | None = None,
                       states: Sequence[OptimizerState] = (), options: CompareOptions = CompareOptions(),
                       buffers: Mapping[str, Tensor] | None = None, **overrides: Any) -> Comparison:
    """Compare the directions of ``options`` from ``params_t`` (see the module docstring), f evaluated as
    ``evaluation`` says, ``overrides`` replacing some of its fields (as in ``analysis.pair.analyze_pair``).
    ``lr`` is the recorded learning rate, ``recorded`` the optimizer state saved at t, ``states`` other ones."""
    if options.scale not in SCALES:
        raise ConfigError(f"--scale '{options.scale}' is not one of {', '.join(SCALES)}")
    evaluation = replace(evaluation, **overrides) if overrides else evaluation
    method, device, dtype = evaluation.method, evaluation.torch_device, evaluation.torch_dtype
    w_t = cast(params_t, device, dtype)
    update = difference(params_t1, w_t) if params_t1 is not None else None
    with prepared(model, batches, loss, evaluation, buffers=buffers, params=w_t) as objective:
        grad = objective.gradient(w_t)
        point = StepPoint(w_t, grad, objective.value, update, lr, recorded, list(states), options.mezo,
                          options.clip_fraction)
        names = parse_names(options.directions, point)
        steps = {name: own_step(name, point) for name in names}
        kept = {name for name, (_, own) in steps.items() if name == "update" or (options.scale == "own" and own)}
        reference, ref_norm = _reference(point, steps)
        if ref_norm is None and set(steps) - kept:
            raise ConfigError("no length to rescale the directions to: pass CKPT_T1, or compare checkpoints that "
                              "record their optimizer (a learning rate or a saved state)")
        directions: dict[str, Params] = {}
        for name, (d, _) in steps.items():
            n = norm(d)
            directions[name] = d if name in kept or n == 0 else {k: v * (ref_norm / n) for k, v in d.items()}
        rows, chosen, gg, notes = [], method, dot(grad, grad), []
        for name, d in directions.items():
            chosen, r, new = objective.derivatives(w_t, d, chosen)
            notes += [n for n in new if n not in notes]
            after = objective.value(cast(params_t1, device, dtype) if name == "update" and params_t1 is not None
                                    else {k: w_t[k] + d[k] for k in w_t})
            rows.append([r.loss, r.grad_corr, r.dir_sharpness, after, dot(d, d), gg,
                         dot(d, update) if update is not None else torch.zeros((), device=device), dot(grad, d)])
        # one host transfer for every direction's numbers
        table = torch.stack([torch.stack([torch.as_tensor(x, device=device).double() for x in row]) for row in rows]).cpu().tolist()
        loss_t, grad_norm = table[0][0], math.sqrt(table[0][5])
        update_norm = norm(update) if update is not None else None
        out = []
        for name, (_, gd, dhd, after, dd, _, du, gdd) in zip(directions, table):
            n = math.sqrt(dd)
            row: dict[str, Any] = {"name": name, "scale": "own" if name in kept else "update", **quadratic_model(gd, dhd, n),
                                   "own_norm": norm(steps[name][0]), "loss_after": after,
                                   "delta_loss": after - loss_t, "taylor_residual": after - loss_t - (gd + 0.5 * dhd),
                                   "cos_with_update": cosine(du, n, update_norm), "cos_with_grad": cosine(gdd, n, grad_norm)}
            if options.line_search:
                ls = line_search(objective, w_t, directions[name], options.line_search, loss_t, gd, dhd)
                row["line_search"] = {"best_alpha": ls["best_alpha"], "best_loss": ls["best_loss"],
                                      "alpha": ls["alpha"], "loss": ls["loss"]}
            out.append(row)
    return Comparison(loss_t=loss_t, grad_norm=grad_norm, num_examples=objective.num_examples,
                      dtype=str(dtype).removeprefix("torch."), device=str(device), method=chosen,
                      scale=options.scale, reference=reference, reference_norm=ref_norm,
                      clip_fraction=options.clip_fraction, directions=out, warnings=notes)


def _reference(point: StepPoint, steps: dict[str, tuple[Params, bool]]) -> tuple[str | None, float | None]:
    """(the name, the length) of the step every direction is rescaled to under ``--scale update``;
    (None, None) when there is none."""
    if point.update is not None:
        return "update", norm(point.update)
    if point.recorded is not None:
        name = point.recorded.name
        return name, norm(steps[name][0] if name in steps else own_step(name, point)[0])
    if point.lr is not None:
        return "sgd", point.lr * norm(point.grad)
    return None, None


def compare_checkpoints(ckpt_t: Checkpoint, ckpt_t1: Checkpoint | None, batches: Sequence[Batch],
                        settings: Settings = Settings(), options: CompareOptions = CompareOptions()) -> Comparison:
    """Compare the directions at checkpoint t (the model, loss, learning rate and optimizer state from its
    metadata and folder), with the update to ``ckpt_t1`` when given."""
    p = prepare_pair(ckpt_t, ckpt_t1, settings, batches)
    recorded = recorded_state(ckpt_t)
    result = compare_directions(
        p.model, p.params_t, p.params_t1, batches, p.loss, settings, lr=ckpt_t.learning_rate,
        recorded=recorded, states=[other_state(s, ckpt_t.step) for s in options.states], options=options,
        buffers=p.buffers_t)
    update_norm = next((d["own_norm"] for d in result.directions if d["name"] == "update"), None)
    # ‖Δ‖ as measured tells a zero step without comparing every tensor of the two checkpoints again
    warnings = pair_warnings(ckpt_t, ckpt_t1, p.model, settings.train, update_norm) if ckpt_t1 is not None else []
    if recorded is None:
        warnings += missing_state_warnings(ckpt_t, bool(options.states))
    result.step_t = ckpt_t.step
    result.step_t1 = ckpt_t1.step if ckpt_t1 is not None else None
    result.warnings = warnings + result.warnings
    result.subset = dict(p.subset)
    return result


def compare_files(path_t: str | os.PathLike, path_t1: str | os.PathLike | None = None,
                  batch_paths: Sequence[str | os.PathLike] = (), settings: Settings = Settings(),
                  options: CompareOptions = CompareOptions()) -> Comparison:
    """``compare_checkpoints`` on files, on ``batch_paths`` or else the batch recorded in ``path_t``; refused
    where ``settings`` ask to stream (``refuse_streaming``)."""
    refuse_streaming(path_t, path_t1, settings)
    ckpt_t = load_checkpoint(path_t, settings.base_folder)
    ckpt_t1 = load_checkpoint(path_t1, settings.base_folder) if path_t1 is not None else None
    return compare_checkpoints(ckpt_t, ckpt_t1, batches_for(ckpt_t, batch_paths), settings, options)


def refuse_streaming(path_t: str | os.PathLike, path_t1: str | os.PathLike | None, settings: Settings) -> None:
    """compare cannot stream: every direction but the update is built from g = ∇f(w_t) (with the recorded
    optimizer state), a backward pass through the whole model, and each is then differentiated along with a
    Hessian-vector product. ``stream`` is a usage error; ``max_memory`` refuses a pair whose in-memory
    comparison is estimated (``in_memory_bytes``, from the headers alone) to need more than that many bytes."""
    if settings.stream:
        raise ConfigError("--stream: compare's directions other than the update are built from the gradient "
                          "∇f(w_t), which needs the whole model in memory, so compare does not stream; "
                          "analyse the update alone with 'zeroptim analyze --method taylor --stream'")
    if settings.max_memory is not None:
        heads = [open_lazily(p)[0] for p in (path_t, path_t1) if p is not None]
        need = in_memory_bytes(heads[0], heads[-1] if len(heads) > 1 else None, settings)
        if need > settings.max_memory:
            raise ZeroptimError(f"--max-memory: comparing directions at '{path_t}' needs about {need / 1e9:.1f} GB "
                                f"in memory, more than {settings.max_memory / 1e9:.1f} GB, and compare does not "
                                "stream; analyse the update alone with 'zeroptim analyze --stream'")
