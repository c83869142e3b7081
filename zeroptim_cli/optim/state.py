"""An optimizer's state as safetensors tensors, and a step taken again from a saved state.

File ``optim_{step:06d}.safetensors`` (the state just before step t): tensors named
``<parameter name>/<state key>`` (Python numbers as 0-d tensors, e.g. Adam's ``step``), and metadata
``zeroptim`` = ``{"format": 1, "step": t, "optimizer": <description>, "param_groups": n}``, n the groups
that differ in a hyper-parameter; when n > 1 also ``"groups"``: for every group of the optimizer, its
parameters' names (``"params"``) and its hyper-parameters (as Trainer's no-decay group for biases and
LayerNorm weights beside a group with weight decay, or a scheduler's per-group learning rates). Its name
and metadata are ``io.layout``'s.

Taking the step again (``replay_step``): the optimizer is rebuilt from its description by the built-in
registry (never from a class named in a file), the saved state is loaded through torch's own
``load_state_dict`` (which casts moments to the parameters' dtype and device and keeps ``step`` as torch
keeps it), p.grad = g is set on a copy of w, and ``step`` is called — with a closure evaluating the loss
for optimizers that need one (MeZO). The step is d = w_new − w: the same code on the same numbers, so every
optimizer of the registry is reproduced exactly, clipping wrapper included. A description with ``groups``
(``OptimizerState`` adds the file's) is rebuilt with those parameter groups, each with its own
hyper-parameters over the description's; a parameter in no group is not stepped (d = 0), as the recorded
optimizer did not step it. A description with
``max_grad_norm`` c (a training loop's clipping by global norm, as Trainer's) clips g first with torch's
``clip_grad_norm_``: g ← g · min(1, c / (‖g‖ + 1e−6)). A description with ``gradient_scale`` s
(``io.layout.GRADIENT_SCALE``: the loop stepped along s·∇f, as Trainer along the sum of k micro-batch means)
takes the step with s·g, before that clipping (the loop clips the gradient it accumulated).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import atomic_path, read_safetensors
from zeroptim_cli.io.layout import (
    StateMetadata,
    encode_metadata,
    gradient_scale,
    parse_state_metadata,
    state_metadata,
)
from zeroptim_cli.optim.optimizers import (
    OPTIMIZERS,
    CoordinateClip,
    build_optimizer,
    class_path,
    group_hyperparameters,
    optimizer_description,
)
from zeroptim_cli.vectors import Params


def _names(model: nn.Module) -> Callable[[Tensor], str]:
    """A parameter's name in ``model`` (its id for one that is not the model's)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return lambda param: names.get(id(param), str(id(param)))


def state_tensors(model: nn.Module, optimizer: Any) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as ``{"<param name>/<key>": tensor}`` (safetensors-ready)."""
    name = _names(model)
    out: dict[str, Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, (Tensor, int, float)):
                out[f"{name(param)}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def group_descriptions(model: nn.Module, optimizer: Any) -> list[dict[str, Any]]:
    """Every parameter group of ``optimizer``: ``{"params": [names in model], <hyper-parameters>}``."""
    name = _names(model)
    return [{"params": [name(p) for p in g["params"]], **group_hyperparameters(g)} for g in optimizer.param_groups]


def distinct_groups(optimizer: Any) -> int:
    """The parameter groups that differ in a hyper-parameter: groups alike but for their parameters (as
    Trainer's decay and no-decay groups are without weight decay) step as one."""
    return len({repr(sorted((k, v) for k, v in g.items() if k != "params")) for g in optimizer.param_groups})


def save_state(path: Path, model: nn.Module, optimizer: Any, step: int,
               description: dict[str, Any] | None = None) -> None:
    """Write the state file of ``optimizer`` (over ``model``'s parameters) before step ``step``, atomically;
    ``description`` replaces ``optimizer_description(optimizer)`` (e.g. with the loop's ``max_grad_norm``);
    parameter groups that differ are recorded with their parameters (module docstring)."""
    distinct = distinct_groups(optimizer)
    meta = state_metadata(step, description or optimizer_description(optimizer), distinct,
                          group_descriptions(model, optimizer) if distinct > 1 else None)
    with atomic_path(path) as tmp:
        save_file(state_tensors(model, optimizer), str(tmp), metadata=encode_metadata(meta))


@dataclass(frozen=True)
class SavedState:
    """A state file: its tensors, and its metadata (the step and optimizer it records, ``io.layout``'s)."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: StateMetadata = StateMetadata()


def load_state_file(path: str | os.PathLike, step: int | None = None) -> SavedState:
    """Read an ``optim_*.safetensors`` file (found beside checkpoint ``step``, when given: a step it records
    must be that one)."""
    p = Path(path)
    tensors, raw = read_safetensors(p, "optimizer state")
    return SavedState(p, tensors, parse_state_metadata(raw, p, step))


def rebuild(description: Mapping[str, Any], params: Mapping[str, Tensor]) -> torch.optim.Optimizer | CoordinateClip:
    """The built-in optimizer ``description`` names, over ``params`` (by name), with its recorded
    hyper-parameters, in its recorded ``groups`` if any (the parameters of each, by name, and its own
    hyper-parameters over the description's).

    A recorded ``class`` must be the registry's own class of that name (a user's optimizer that happens
    to be called ``adam`` is not rebuilt as torch's). Keys the constructor does not take (e.g. a
    scheduler's ``initial_lr``) are left out; each group's current ``lr`` is the one recorded.
    """
    spec = dict(description)
    groups = spec.pop("groups", None)
    recorded_class, name = spec.pop("class", None), spec.get("name")
    if name not in OPTIMIZERS:
        raise ZeroptimError(f"optimizer '{name}' is not one zeroptim can take a step of ({', '.join(OPTIMIZERS)})")
    cls = OPTIMIZERS[name]
    if recorded_class is not None:
        ours = class_path(cls)  # type: ignore[arg-type]
        if (recorded_class.split(".")[0], recorded_class.rpartition(".")[2]) != (ours.split(".")[0], cls.__qualname__):
            raise ZeroptimError(f"optimizer '{name}' was recorded as class '{recorded_class}', not the built-in '{ours}'")
    accepted = set(inspect.signature(cls).parameters)
    spec = {k: v for k, v in spec.items() if k in accepted or k in ("name", "clip")}
    if not groups:
        return build_optimizer(params.values(), spec)
    unknown = [n for g in groups for n in g["params"] if n not in params]
    if unknown:
        raise ZeroptimError(f"its parameter groups name '{unknown[0]}', which is no parameter of the model")
    hyper = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k in accepted and k != "params"}
             for g in groups]
    return build_optimizer([{**h, "params": [params[n] for n in g["params"]]} for h, g in zip(hyper, groups)], spec)


def replay_step(description: Mapping[str, Any], state: Mapping[str, Tensor], w: Params, grad: Params | None,
                loss: Callable[[Params], Tensor] | None = None, source: str = "optimizer state") -> Params:
    """d = w_new − w for one step of the described optimizer from ``state`` at ``w`` with gradient ``grad``
    (``loss`` evaluates f at given parameters, for optimizers that need a closure); see the module docstring."""
    params = {k: v.detach().clone() for k, v in w.items()}
    try:
        optimizer = rebuild(description, params)
    except ZeroptimError as exc:  # hyper-parameters of a file are bad data, not a bad flag
        raise ZeroptimError(f"{source}: the recorded optimizer cannot be rebuilt ({exc})") from exc
    # torch's state_dict numbers the parameters in the order of its groups
    groups = description.get("groups")
    index = {name: i for i, name in enumerate([n for g in groups for n in g["params"]] if groups else params)}
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, entry = key.rpartition("/")
        if name not in index:
            raise ZeroptimError(f"{source}: '{key}' belongs to no parameter of the model")
        per_param.setdefault(index[name], {})[entry] = value.clone()  # torch steps the loaded state in place
    saved = optimizer.state_dict()
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ZeroptimError(f"{source}: the saved state does not fit the optimizer ({exc})") from exc
    try:
        scale = gradient_scale(description)
    except ValueError as exc:
        raise ZeroptimError(f"{source}: {exc}") from exc
    needs_closure = getattr(optimizer, "needs_closure", False)
    if not needs_closure:
        if grad is None:
            raise ZeroptimError(f"optimizer '{description.get('name')}' needs the gradient")
        for k, p in params.items():
            p.grad = grad[k].detach().clone() if scale == 1 else scale * grad[k].detach()
        max_norm = description.get("max_grad_norm")
        if max_norm:  # the loop's clipping by global norm (Trainer's max_grad_norm), torch's own function
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], float(max_norm))
    if needs_closure and loss is None:
        raise ZeroptimError(f"optimizer '{description.get('name')}' needs the loss to step")
    try:
        optimizer.step((lambda: loss(params)) if needs_closure else None)  # type: ignore[misc]
    except (ValueError, TypeError, RuntimeError) as exc:  # a recorded value of the wrong type or shape
        raise ZeroptimError(f"{source}: the recorded optimizer cannot take a step ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return {k: params[k].detach() - w[k] for k in w}
