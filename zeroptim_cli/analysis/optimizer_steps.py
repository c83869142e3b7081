"""The steps optimizers would take from w_t, as directions d to compare (``analysis.compare``).

Rules of the gradient alone, with lr the learning rate recorded in checkpoint t (``has_own_length``
is False without one: the direction then only has a shape, and is rescaled):

    update          Δ = w_t1 − w_t (needs CKPT_T1)
    sgd             −lr·g
    sign-sgd        −lr·sign(g)
    normalized-sgd  −lr·g/‖g‖
    mezo            MeZO's step (``optim.mezo``): −lr·(1/S)Σ_s c_s z_s, seeded, two forward passes a sample

Optimizers with a state, stepped for real from a saved state by ``optim.state.replay_step`` (torch's own
code on the saved numbers, so the recorded optimizer's direction is the realized step):

    the recorded optimizer, from ``optim_{t:06d}.safetensors`` beside checkpoint t, under its own name
    (``adam``, ``adamw``, ``lion``, ``adafactor``, ``signsgd``, ``normalized_sgd``, ``mezo`` with its own
    seed; plain SGD's step is ``sgd``; ``sgd-momentum`` / ``sgd-wd`` for SGD with momentum / only weight
    decay; ``-clipped`` appended when it was trained with the clipping wrapper); also named ``recorded``.
    another state (``--state FILE``, e.g. an Adam run's at the same step, or ``--state RUN_FOLDER`` for
    its file at step t): that optimizer's step from w_t with this run's g, named ``NAME@RUN`` (RUN: the
    file's folder).

``NAME+clip``: any of these with the paper's coordinate-wise clipping applied to the step: with τ the
⌈c·n⌉-th largest |d_i|, d_i ← sign(d_i)·min(|d_i|, τ) (``vectors.clip_threshold``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.checkpoint import Checkpoint, load_checkpoint
from zeroptim_cli.io.layout import TRAINER_OPTIMIZER_FILE, TRAINER_RUN_FOLDER, ckpt_name, state_name
from zeroptim_cli.optim.state import SavedState, load_state_file, replay_step
from zeroptim_cli.vectors import Params, clip_threshold, norm

RULES = ("update", "sgd", "sign-sgd", "normalized-sgd", "mezo")
CLIP = "+clip"
RECORDED = "recorded"


@dataclass(frozen=True)
class MezoSettings:
    """MeZO's ε, samples and seed for the ``mezo`` direction; None keeps the recorded MeZO run's own (or
    the defaults 1e-3, 1 and 0 when the run was not trained with MeZO)."""

    eps: float | None = None
    samples: int | None = None
    seed: int | None = None

    def spec(self, lr: float, recorded: dict[str, Any] | None) -> dict[str, Any]:
        base = dict(recorded) if recorded else {"name": "mezo", "lr": lr, "eps": 1e-3, "samples": 1, "seed": 0}
        given = {"eps": self.eps, "samples": self.samples, "seed": self.seed}
        return {**base, **{k: v for k, v in given.items() if v is not None}}


@dataclass(frozen=True)
class OptimizerState:
    """An optimizer ready to step: its description (``optim.optimizers.optimizer_description``, with the
    state file's parameter ``groups`` when it records several) and the tensors of its saved state."""

    name: str
    description: dict[str, Any]
    tensors: dict[str, Tensor]
    source: str


@dataclass
class StepPoint:
    """Where every step is taken from: w_t, g = ∇f(w_t), f itself (for MeZO), Δ when known, the recorded
    learning rate and the optimizer states at hand (the recorded one first)."""

    w: Params
    grad: Params
    loss: Callable[[Params], Tensor]
    update: Params | None = None
    lr: float | None = None
    recorded: OptimizerState | None = None
    states: list[OptimizerState] = field(default_factory=list)
    mezo: MezoSettings = MezoSettings()
    clip_fraction: float = 0.1

    def names(self) -> list[str]:
        """Every direction this point can give, unclipped."""
        own = [s.name for s in ([self.recorded] if self.recorded else []) + self.states]
        rules = [r for r in RULES if r != "update" or self.update is not None]
        return rules + [n for n in own if n not in rules]


def recorded_name(description: dict[str, Any]) -> str:
    """The direction name of an optimizer's own step (see the module docstring)."""
    name = str(description.get("name"))
    if name == "sgd" and description.get("momentum"):
        name = "sgd-momentum"
    elif name == "sgd" and description.get("weight_decay"):
        name = "sgd-wd"
    return name + ("-clipped" if description.get("clip") else "")


def _state(saved: SavedState, description: dict[str, Any] | None, name: str) -> OptimizerState:
    description = saved.metadata.optimizer or description
    if not description:
        raise ZeroptimError(f"optimizer state '{saved.path}' records no optimizer, nor does its checkpoint")
    groups, count = saved.metadata.groups, saved.metadata.param_groups
    if count != 1 and groups is None:
        raise ZeroptimError(f"optimizer state '{saved.path}' has {count} parameter groups but records not which "
                            "parameters each holds; only one can be stepped again")
    if groups is not None:  # replay_step rebuilds the optimizer with its groups
        description = {**description, "groups": groups}
    return OptimizerState(name or recorded_name(description), description, saved.tensors, str(saved.path))


def recorded_state(ckpt_t: Checkpoint) -> OptimizerState | None:
    """The state saved beside checkpoint t (``optim_{t:06d}.safetensors``), None when there is none."""
    if ckpt_t.step is None:
        return None
    path = ckpt_t.path.parent / state_name(ckpt_t.step)
    if not path.exists():
        return None
    return _state(load_state_file(path, ckpt_t.step), ckpt_t.meta.get("optimizer"), "")


def other_state(path: str | Path, step: int | None) -> OptimizerState:
    """A state given with ``--state``: a file, or a run folder's file at ``step``
    (``optim_{step:06d}.safetensors``); its optimizer's step, named ``NAME@RUN``."""
    p = Path(path)
    if p.is_dir():
        if step is None:
            raise ZeroptimError(f"--state '{p}' is a folder, but the checkpoint records no step to pick its state by")
        p = p / state_name(step)
    saved = load_state_file(p)
    description, recorded_step = saved.metadata.optimizer, saved.metadata.step
    if description is None and recorded_step is not None:  # files written before states recorded their optimizer
        sibling = p.parent / ckpt_name(recorded_step)
        description = load_checkpoint(sibling).meta.get("optimizer") if sibling.exists() else None
    state = _state(saved, description, "")
    return OptimizerState(f"{state.name}@{p.resolve().parent.name}", state.description, state.tensors, state.source)


def split_name(name: str) -> tuple[str, bool]:
    """(the direction's base name, whether it is clipped)."""
    return (name[: -len(CLIP)], True) if name.endswith(CLIP) else (name, False)


def own_step(name: str, point: StepPoint) -> tuple[Params, bool]:
    """(the step ``name`` takes from ``point`` at its own length, whether that length is its own)."""
    base, clip = split_name(name)
    d, own = _unclipped(base, point)
    if clip:
        tau = clip_threshold(list(d.values()), point.clip_fraction)
        d = {k: v.clamp(-tau, tau) for k, v in d.items()}
    return d, own


def _unclipped(base: str, point: StepPoint) -> tuple[Params, bool]:
    g, lr = point.grad, point.lr
    if base == "mezo":  # the recorded MeZO run's own settings and step count, unless flags change them
        rec = point.recorded if point.recorded and point.recorded.description.get("name") == "mezo" else None
        spec = point.mezo.spec(lr if lr is not None else 1.0, rec.description if rec else None)
        return replay_step(spec, rec.tensors if rec else {}, point.w, None, point.loss, "mezo"), lr is not None
    states = {s.name: s for s in point.states}
    if point.recorded is not None:
        states[point.recorded.name] = states[RECORDED] = point.recorded
    if base in states:
        s = states[base]
        return replay_step(s.description, s.tensors, point.w, g, point.loss, s.source), True
    if base == "update":
        if point.update is None:
            raise ConfigError("direction 'update' needs CKPT_T1")
        return point.update, True
    scale = -(lr if lr is not None else 1.0)
    if base == "sgd":
        return {k: scale * v for k, v in g.items()}, lr is not None
    if base == "sign-sgd":
        return {k: scale * torch.sign(v) for k, v in g.items()}, lr is not None
    if base == "normalized-sgd":
        n = norm(g)
        return {k: scale * v / n if n > 0 else torch.zeros_like(v) for k, v in g.items()}, lr is not None
    raise unknown_direction(base, point)


#: Directions that only an optimizer's saved state gives (the recorded one's, or one passed with --state).
STATEFUL = ("adam", "adamw", "lion", "adafactor", "signsgd", "normalized_sgd", "sgd-momentum", "sgd-wd", RECORDED)


def unknown_direction(base: str, point: StepPoint) -> ConfigError:
    """The error for a direction ``point`` cannot give: which ones it can, and, for an optimizer's step,
    where its state comes from (beside CKPT_T, or ``--state``, named ``NAME@RUN``)."""
    available = ", ".join(point.names() + ([RECORDED] if point.recorded else []))
    if base not in STATEFUL:
        return ConfigError(f"--directions: '{base}' is not one of {available} (each may end in +clip)")
    if base == RECORDED:
        why = "'recorded' needs the optimizer's saved state beside CKPT_T (optim_*.safetensors of its step), and there is none"
    elif point.recorded is not None or point.states:
        why = f"'{base}' is the step of no optimizer state at hand"
    else:
        why = f"'{base}' needs its optimizer's saved state, and there is none beside CKPT_T"
    return ConfigError(f"--directions: {why}; the directions available are {available} (each may end in +clip); "
                       "a state passed with --state FILE (e.g. another run's optim_*.safetensors, or a run folder) "
                       "gives its optimizer's step as NAME@RUN, RUN the file's folder (adamw@zeroptim for "
                       "OUTPUT_DIR/zeroptim)")


def missing_state_warnings(ckpt_t: Checkpoint, passed_states: bool) -> list[str]:
    """Why the recorded optimizer's step is not compared, when ``recorded_state`` found no state beside CKPT_T:
    its metadata names an optimizer other than plain SGD, or it is a Trainer ``checkpoint-N`` folder, whose
    ``optimizer.pt`` is a pickle zeroptim never opens (the ZeroptimCallback saves the state it can read)."""
    optimizer = ckpt_t.meta.get("optimizer") or {}
    if optimizer.get("name") not in (None, "sgd"):
        return [f"no optimizer state beside '{ckpt_t.path}': the {optimizer.get('name')} step is not compared"]
    if passed_states or not (ckpt_t.path.is_dir() and (ckpt_t.path / TRAINER_OPTIMIZER_FILE).exists()):
        return []
    run = ckpt_t.path.parent / TRAINER_RUN_FOLDER
    return [f"'{ckpt_t.path / TRAINER_OPTIMIZER_FILE}' is Trainer's optimizer state, a pickle zeroptim never opens: "
            "its step (AdamW's, …) is not compared. It needs the optimizer state the ZeroptimCallback saves "
            f"(optim_*.safetensors in OUTPUT_DIR/{TRAINER_RUN_FOLDER}): pass --state '{run}' (its file at this "
            f"step, compared as NAME@{TRAINER_RUN_FOLDER}), or compare that folder's ckpt_*.safetensors"]


def default_names(point: StepPoint) -> list[str]:
    """Every direction at hand, then the clipped steps of sgd and of the stateful optimizers."""
    names = point.names()
    stateful = [n for n in names if n not in RULES]
    return names + [n + CLIP for n in ["sgd", *stateful]]


def parse_names(spec: str | Sequence[str] | None, point: StepPoint) -> list[str]:
    """``--directions a,b+clip,…`` (None: ``default_names``), each once, in order."""
    if spec is None:
        return default_names(point)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not names:
        raise ConfigError("--directions is empty")
    return names
