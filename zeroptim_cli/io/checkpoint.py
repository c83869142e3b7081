"""Checkpoints: one safetensors file with a model's state dict and optional ``zeroptim`` metadata, or a
Hugging Face folder (``io.hf``), which reads into the same ``Checkpoint`` so that nothing above this
module needs to know where a checkpoint came from; so does a peft adapter folder on its base model
(``io.peft``), and a recorded peft model's file, which names its frozen base weights (metadata ``base``, a
file beside it written once by ``save_base``: ``io.layout.BASE_FILE``).

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
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import LastRead, all_finite, atomic_path, leads_out, read_header, read_safetensors
from zeroptim_cli.io.hf import SPEC_KEY, check_spec_blocks, config_difference, is_hf_folder, read_hf_folder
from zeroptim_cli.io.layout import BASE_ROLE, encode_metadata, parse_metadata, recorded_batch_paths
from zeroptim_cli.io.peft import ADAPTER_CONFIG, PEFT_KEY, is_adapter_folder, read_adapter_folder


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
    def learning_rate(self) -> float | None:
        """The learning rate recorded in the optimizer metadata (``optimizer.lr``), else the one a Hugging Face
        folder's ``trainer_state.json`` logged (metadata ``learning_rate``, ``io.hf``), else None."""
        for lr in ((self.meta.get("optimizer") or {}).get("lr"), self.meta.get("learning_rate")):
            if isinstance(lr, (int, float)) and not isinstance(lr, bool):
                return float(lr)
        return None

    @property
    def folder(self) -> Path:
        """The folder recorded batches are named in: the file's own, or the checkpoint itself if a folder."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def batch_paths(self) -> list[Path]:
        """The recorded batches (metadata ``batches``, else ``batch``), resolved in ``folder``."""
        return recorded_batch_paths(self.meta, self.folder, self.path)


def load_checkpoint(path: str | os.PathLike, base: Path | None = None) -> Checkpoint:
    """Load a checkpoint file, Hugging Face folder or peft adapter folder (on the base model folder
    ``base``, else the one its config names: ``io.peft``), rejecting unreadable files, malformed metadata and
    non-finite weights. A file whose metadata names a ``base`` (a recorded peft model: its frozen weights
    saved once, ``save_base``) holds those weights too."""
    p = Path(path)
    if p.is_dir():
        if is_adapter_folder(p):
            tensors, meta = read_adapter_folder(p, base)
        elif is_hf_folder(p):
            tensors, meta = read_hf_folder(p)
        else:
            raise ZeroptimError(f"checkpoint '{p}' is a directory, but neither a Hugging Face checkpoint folder "
                                f"('config.json' with 'model.safetensors' or its index) nor a peft adapter folder "
                                f"('{ADAPTER_CONFIG}' with 'adapter_model.safetensors')")
        return Checkpoint(p, _finite(tensors, p), meta)
    tensors, raw_meta = read_safetensors(p, "checkpoint")
    if not tensors:
        raise ZeroptimError(f"checkpoint '{p}' holds no tensors")
    meta = parse_metadata(raw_meta, p)
    _finite(tensors, p)
    if meta.get("base") is not None:
        tensors = _with_base(p, meta["base"], tensors)  # the base checked once, when it is read
    check_spec_blocks(meta, len(tensors), p)
    return Checkpoint(p, tensors, meta)


def needs_base(path: Path) -> bool:
    """Whether the checkpoint ``path`` is read with a base model's weights: a peft adapter folder, or a
    file whose header names a recorded ``base`` (an unreadable header: False, reading it says why)."""
    if path.is_dir():
        return is_adapter_folder(path)
    try:
        return parse_metadata(read_header(path, "checkpoint")[1], path).get("base") is not None
    except ZeroptimError:
        return False


#: The last recorded base read, by (resolved path, size, modification time): the checkpoints of one run
#: share its tensors, so that the frozen weights are held once and Δ of them is zero by construction.
_BASES: LastRead[dict[str, torch.Tensor]] = LastRead()


def _with_base(p: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``p`` with those of the recorded base ``name`` beside it."""
    base = p.parent / name
    out = leads_out(p.parent, name)
    if out is not None:
        raise ZeroptimError(f"checkpoint '{p}': its recorded base '{name}' leads out of its folder (to '{out}')")
    real = Path(os.path.realpath(base))
    try:
        st = real.stat()
    except OSError as exc:
        raise ZeroptimError(f"checkpoint '{p}': its recorded base '{base}' cannot be read ({exc.strerror})") from exc
    def read() -> dict[str, torch.Tensor]:
        frozen, raw = read_safetensors(base, "base")
        if parse_metadata(raw, base).get("role") != BASE_ROLE:
            raise ZeroptimError(f"checkpoint '{p}': '{base}', which it names as its base, is not a recorded base")
        return _finite(frozen, base)

    frozen = _BASES.get((str(real), st.st_size, st.st_mtime_ns), read)
    both = sorted(set(frozen) & set(tensors))
    if both:
        raise ZeroptimError(f"checkpoint '{p}' and its base '{base}' both hold '{both[0]}'")
    return {**frozen, **tensors}


def _finite(tensors: dict[str, torch.Tensor], p: Path) -> dict[str, torch.Tensor]:
    """``tensors``, the weights of ``p``, refused if one holds NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ZeroptimError(f"checkpoint '{p}': tensor '{name}' contains NaN or Inf")
    return tensors


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None,
                    parts: Literal["all", "trainable", "frozen"] = "all") -> Path:
    """Save ``model``'s state dict (tied weights once, ``unique_state``) with ``zeroptim`` metadata,
    atomically: every tensor, or all but the frozen parameters (``requires_grad`` False: a peft model's base,
    left to the recorded base), or those alone (the recorded base, ``save_base``)."""
    state = unique_state(model)
    if parts != "all":
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad and n in state}
        state = {k: v for k, v in state.items() if (k in frozen) == (parts == "frozen")}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=encode_metadata(meta or {}))
    return Path(path)


def save_base(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Save the frozen parameters of ``model`` once, as the recorded base that its checkpoints name (metadata
    ``base``) and leave out; ``role`` ``base`` in its metadata."""
    return save_checkpoint(path, model, {**(meta or {}), "role": BASE_ROLE}, parts="frozen")


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
        for key, what in ((SPEC_KEY, "model configs"), (PEFT_KEY, "adapter configs")):
            configs = [spec.get(key) or {} for spec in (a.model_spec, b.model_spec)]
            difference = config_difference(*configs) if all(isinstance(c, dict) for c in configs) else None
            if difference is not None:
                raise ZeroptimError(f"checkpoints hold different {what}: {difference} in '{a.path}' and '{b.path}'")
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
