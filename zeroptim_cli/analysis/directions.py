"""Other directions from the same point w_t, compared with the real update Δ = w_t1 − w_t.

* ``update`` (default): Δ itself.
* ``neg-grad``: −g, and ``neg-sign-grad``: −sign(g), each rescaled to ‖Δ‖ so that every direction is
  compared at the length of the step that was actually taken.
* ``adam``: the step Adam would take from w_t with the moments saved beside checkpoint t
  (``optim_{step:06d}.safetensors``, written by the Recorder) and the recorded hyper-parameters:
  m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², d = −lr·m̂/(√v̂ + ε) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), t the
  step count after this step (AdamW: also −lr·λ·w; Adam: g += λw) — taken by torch's own Adam
  (``optim.state.replay_step``). ``zeroptim compare`` shows every optimizer's step side by side.
* a safetensors file: tensors named like the model's parameters (missing ones are zero).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zeroptim_cli.analysis.optimizer_steps import recorded_state
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.checkpoint import Checkpoint
from zeroptim_cli.io.files import read_safetensors
from zeroptim_cli.io.layout import state_name
from zeroptim_cli.optim.state import replay_step
from zeroptim_cli.vectors import Params, norm

NAMED = ("update", "neg-grad", "neg-sign-grad", "adam")

#: Maps (gradient at w_t, the real update) to the direction to analyse.
Direction = Callable[[Params, Params, Params], Params]


def _rescaled(d: Params, length: float) -> Params:
    n = norm(d)
    return {k: v * (length / n) if n > 0 else v for k, v in d.items()}


def resolve_direction(spec: str, ckpt_t: Checkpoint | None = None) -> Direction | None:
    """The direction function for ``--direction SPEC``; None for the update itself."""
    if spec == "update":
        return None
    if spec == "neg-grad":
        return lambda g, w, update: _rescaled({k: -v for k, v in g.items()}, norm(update))
    if spec == "neg-sign-grad":
        return lambda g, w, update: _rescaled({k: -torch.sign(v) for k, v in g.items()}, norm(update))
    if spec == "adam":
        if ckpt_t is None:
            raise ConfigError("--direction adam needs the checkpoint's optimizer state")
        return adam_direction(ckpt_t)
    path = Path(spec)
    if path.suffix != ".safetensors" and not path.exists():
        raise ConfigError(f"--direction '{spec}' is not one of {', '.join(NAMED)} nor a .safetensors file")
    tensors, _ = read_safetensors(path, "direction")

    def from_file(g: Params, w: Params, update: Params) -> Params:
        unknown = sorted(set(tensors) - set(update))
        if unknown:
            raise ZeroptimError(f"direction file '{path}' has '{unknown[0]}', which is not a model parameter")
        out = {}
        for k, v in update.items():
            t = tensors.get(k)
            if t is not None and t.shape != v.shape:
                raise ZeroptimError(f"direction file '{path}': '{k}' has shape {tuple(t.shape)}, "
                                    f"the parameter {tuple(v.shape)}")
            out[k] = torch.zeros_like(v) if t is None else t.to(device=v.device, dtype=v.dtype)
        return out

    return from_file


def adam_direction(ckpt_t: Checkpoint) -> Direction:
    """The Adam step from the optimizer state saved beside ``ckpt_t``: torch's Adam (or AdamW) rebuilt
    from the recorded hyper-parameters, its state loaded, one step taken (``optim.state.replay_step``)."""
    opt: dict[str, Any] = ckpt_t.meta.get("optimizer") or {}
    if opt.get("name") not in ("adam", "adamw"):
        raise ZeroptimError(f"--direction adam: '{ckpt_t.path}' was not written by an Adam run "
                            f"(optimizer {opt.get('name')!r})")
    if ckpt_t.step is None:
        raise ZeroptimError(f"--direction adam: '{ckpt_t.path}' records no step")
    state = recorded_state(ckpt_t)
    if state is None:
        raise ZeroptimError(f"--direction adam: no optimizer state '{state_name(ckpt_t.step)}' beside '{ckpt_t.path}'")
    return lambda g, w, update: replay_step(state.description, state.tensors, w, g, source=state.source)
