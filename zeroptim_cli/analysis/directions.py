"""Other directions from the same point w_t, compared with the real update Δ = w_t1 − w_t.

* ``update`` (default): Δ itself.
* ``neg-grad``: −g, and ``neg-sign-grad``: −sign(g), each rescaled to ‖Δ‖ so that every direction is
  compared at the length of the step that was actually taken.
* ``adam``: the step Adam would take from w_t with the moments saved beside checkpoint t
  (``optim_{step:06d}.safetensors``, written by the Recorder with ``save_optimizer_state``) and the
  recorded hyper-parameters: m = β₁m + (1−β₁)g, v = β₂v + (1−β₂)g², d = −lr·m̂/(√v̂ + ε) with
  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), t the step count after this step (AdamW: also −lr·λ·w; Adam: g += λw).
* a safetensors file: tensors named like the model's parameters (missing ones are zero).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.checkpoint import Checkpoint
from zeroptim_cli.io.files import read_safetensors
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
    """The Adam step from the optimizer state saved beside ``ckpt_t`` (see the module docstring)."""
    opt: dict[str, Any] = ckpt_t.meta.get("optimizer") or {}
    if opt.get("name") not in ("adam", "adamw"):
        raise ZeroptimError(f"--direction adam: '{ckpt_t.path}' was not written by an Adam run "
                            f"(optimizer {opt.get('name')!r})")
    if ckpt_t.step is None:
        raise ZeroptimError(f"--direction adam: '{ckpt_t.path}' records no step")
    state_path = ckpt_t.path.parent / f"optim_{ckpt_t.step:06d}.safetensors"
    state, _ = read_safetensors(state_path, "optimizer state")
    lr, eps, wd = float(opt.get("lr", 1e-3)), float(opt.get("eps", 1e-8)), float(opt.get("weight_decay", 0.0))
    b1, b2 = (float(b) for b in opt.get("betas", (0.9, 0.999)))
    decoupled = opt["name"] == "adamw"

    def step(g: Params, w: Params, update: Params) -> Params:
        out = {}
        for k, grad in g.items():
            grad = grad if decoupled or not wd else grad + wd * w[k]
            m = state.get(f"{k}/exp_avg")
            v = state.get(f"{k}/exp_avg_sq")
            t = float(state[f"{k}/step"]) + 1 if f"{k}/step" in state else 1.0
            m = (1 - b1) * grad if m is None else b1 * m.to(grad) + (1 - b1) * grad
            v = (1 - b2) * grad * grad if v is None else b2 * v.to(grad) + (1 - b2) * grad * grad
            d = -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            out[k] = d - lr * wd * w[k] if decoupled and wd else d
        return out

    return step
