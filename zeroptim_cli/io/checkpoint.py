"""Checkpoints: one safetensors file with a model's state dict and optional ``zeroptim`` metadata, or a
Hugging Face folder (``io.hf``), which reads into the same ``Checkpoint`` so that nothing above this
module needs to know where a checkpoint came from.

The metadata (string key ``zeroptim``, a JSON object) follows docs/contract.md::

    {"format": 1, "model": {"name": "mlp", "kwargs": {...}}, "step": 120, "loss": "cross_entropy",
     "optimizer": {"name": "sgd", "lr": 0.1}, "batch": "batch_000120.safetensors",
     "versions": {"zeroptim": "0.1.0", "torch": "2.13.0", "python": "3.12.3"}}

``versions`` (what wrote the file) is added by ``save_checkpoint``; readers never need it. ``model`` names
exactly one of: a built-in ``{"name": "mlp", "kwargs": {...}}`` (``models.REGISTRY``), a factory
``{"factory": "pkg.mod:fn", "kwargs": {...}}`` (code named by the file, so it is run only with the user's
explicit opt-in, ``--trust-code``: docs/contract.md), or ``{"hf_config": {...}}``, a transformers config built by transformers' own
classes (``models.hf``). ``run_id`` (a string) and ``train_mode`` (a bool) are optional. ``batches`` (a list of
paths) may stand for ``batch`` when the step used several batches, e.g. the micro-batches of gradient
accumulation; f is then their exact mean. The
metadata is written and checked by ``io.layout``, with the names of a run's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import atomic_path, read_safetensors
from zeroptim_cli.io.hf import SPEC_KEY, check_spec_blocks, config_difference, read_hf_folder, require_hf_folder
from zeroptim_cli.io.layout import encode_metadata, parse_metadata, recorded_batch_paths


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: every tensor of the file and the parsed ``zeroptim`` metadata ({} if none)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def model_spec(self) -> dict[str, Any] | None:
        return self.meta.get("model")

    @property
    def folder(self) -> Path:
        """The folder recorded batches are named in: the file's own, or the checkpoint itself if a folder."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def batch_paths(self) -> list[Path]:
        """The recorded batches (metadata ``batches``, else ``batch``), resolved in ``folder``."""
        return recorded_batch_paths(self.meta, self.folder, self.path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint file or Hugging Face folder, rejecting unreadable files, malformed metadata and
    non-finite weights."""
    p = Path(path)
    if p.is_dir():
        require_hf_folder(p)
        tensors, meta = read_hf_folder(p)
        return _checked(Checkpoint(p, tensors, meta))
    tensors, raw_meta = read_safetensors(p, "checkpoint")
    if not tensors:
        raise ZeroptimError(f"checkpoint '{p}' holds no tensors")
    meta = parse_metadata(raw_meta, p)
    check_spec_blocks(meta, len(tensors), p)
    return _checked(Checkpoint(p, tensors, meta))


def _checked(ckpt: Checkpoint) -> Checkpoint:
    for name, tensor in ckpt.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ZeroptimError(f"checkpoint '{ckpt.path}': tensor '{name}' contains NaN or Inf")
    return ckpt


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state dict (tied weights once, ``unique_state``) with ``zeroptim`` metadata, atomically."""
    with atomic_path(path) as tmp:
        save_file(unique_state(model), str(tmp), metadata=encode_metadata(meta or {}))
    return Path(path)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under the name ``named_parameters()`` gives it (the first
    registered: GPT-2's embedding ``transformer.wte.weight``, not ``lm_head.weight``, as transformers'
    ``save_pretrained`` stores it too), contiguous."""
    state = model.state_dict()
    order = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] + list(state)
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    for name in dict.fromkeys(n for n in order if n in state):
        tensor = state[name]
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.detach().contiguous()
    return kept


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Both checkpoints must hold the same tensor names and shapes, and name the same model if they say."""
    only_a, only_b = set(a.tensors) - set(b.tensors), set(b.tensors) - set(a.tensors)
    if only_a or only_b:
        name, where, other = (sorted(only_a)[0], a.path, b.path) if only_a else (sorted(only_b)[0], b.path, a.path)
        raise ZeroptimError(f"checkpoints differ in keys: '{name}' is in '{where}' but not in '{other}'")
    for name, tensor in a.tensors.items():
        if tensor.shape != b.tensors[name].shape:
            raise ZeroptimError(
                f"checkpoints differ in shape of '{name}': {tuple(tensor.shape)} in '{a.path}', "
                f"{tuple(b.tensors[name].shape)} in '{b.path}'"
            )
    if a.model_spec and b.model_spec and a.model_spec != b.model_spec:
        configs = [spec.get(SPEC_KEY) for spec in (a.model_spec, b.model_spec)]
        if all(isinstance(c, dict) for c in configs):
            raise ZeroptimError(f"checkpoints hold different model configs: {config_difference(*configs)} "
                                f"in '{a.path}' and '{b.path}'")
        raise ZeroptimError(f"checkpoints name different models: '{a.path}' and '{b.path}'")


def state_for_model(model: nn.Module, ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Match a checkpoint's tensors to ``model``: (parameters, persistent buffers).

    Tied weights may be stored under any one of their names; parameters come back keyed by their first
    name in ``named_parameters()`` order, once each, which ``torch.func.functional_call`` re-ties.
    """
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(name)
    resolved: dict[str, torch.Tensor] = {}
    for names in aliases.values():
        stored = [n for n in names if n in ckpt.tensors]
        if not stored:
            raise ZeroptimError(f"checkpoint '{ckpt.path}' lacks '{names[0]}', which the model has")
        for n in names:
            resolved[n] = ckpt.tensors[stored[0]]
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    if unexpected:
        raise ZeroptimError(f"checkpoint '{ckpt.path}' holds '{unexpected[0]}', which the model does not have")
    for name, tensor in expected.items():
        if resolved[name].shape != tensor.shape:
            raise ZeroptimError(
                f"checkpoint '{ckpt.path}': '{name}' has shape {tuple(resolved[name].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    all_param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    params = {n: resolved[n] for n, _ in model.named_parameters()}
    for name, tensor in params.items():
        if not tensor.is_floating_point():
            raise ZeroptimError(f"checkpoint '{ckpt.path}': parameter '{name}' is stored as {str(tensor.dtype)[6:]}; "
                                "parameters must be floating point")
    buffers = {n: t for n, t in resolved.items() if n not in all_param_names}
    return params, buffers
