"""Batches: a safetensors file with tensors ``inputs`` and ``targets``, first dimension = examples; or, as
Hugging Face data collators make them, keyword arguments of the model (``input_ids`` or ``pixel_values``,
with ``attention_mask``, ``token_type_ids``, ``position_ids``, … beside) and their ``labels``.

A batch is called as ``model(inputs)`` when ``inputs`` is a tensor and as ``model(**inputs)`` when it is
a dict of keyword arguments; ``targets`` (``labels`` in a keyword-argument file) go to the loss only,
never to the model, so the model's own loss is never computed behind our back (see
``derivatives.transformers_loss`` for why).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import all_finite, atomic_path, read_safetensors

#: Tensors that mark a batch file as keyword arguments of a Hugging Face model.
KWARGS_MARKERS = ("input_ids", "pixel_values")
#: Where a keyword-argument file keeps the targets.
LABELS = "labels"
#: The targets that count for nothing (PyTorch's and transformers' ``ignore_index``).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    """Model inputs and loss targets; ``source`` names where they came from in error messages.

    ``inputs`` is a tensor (passed positionally) or a mapping of keyword arguments; every tensor of the
    batch shares the first (examples) dimension.
    """

    inputs: torch.Tensor | Mapping[str, torch.Tensor]
    targets: torch.Tensor
    source: str = "<batch>"

    def __post_init__(self) -> None:
        named = self.tensors()
        for name, tensor in named.items():
            if tensor.dim() == 0:
                raise ZeroptimError(f"batch '{self.source}': '{name}' needs a first (examples) dimension")
        (first, t0), *rest = named.items()
        for name, tensor in rest:
            if tensor.shape[0] != t0.shape[0]:
                raise ZeroptimError(f"batch '{self.source}': '{first}' has {t0.shape[0]} examples "
                                    f"but '{name}' has {tensor.shape[0]}")
        if t0.shape[0] == 0:
            raise ZeroptimError(f"batch '{self.source}' holds no examples")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by the name it has in a batch file."""
        if isinstance(self.inputs, torch.Tensor):
            return {"inputs": self.inputs, "targets": self.targets}
        return {**self.inputs, LABELS: self.targets}

    @property
    def keyword(self) -> bool:
        """Whether the model takes this batch as keyword arguments."""
        return not isinstance(self.inputs, torch.Tensor)

    @property
    def input_ids(self) -> torch.Tensor | None:
        """The token ids a language model reads: ``inputs`` itself, or the ``input_ids`` keyword."""
        return self.inputs.get("input_ids") if isinstance(self.inputs, Mapping) else self.inputs

    def model_args(self) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """(positional, keyword) arguments of the model call."""
        return ((), dict(self.inputs)) if isinstance(self.inputs, Mapping) else ((self.inputs,), {})

    @property
    def num_examples(self) -> int:
        return int(self.targets.shape[0])

    def _map(self, fn: Any, source: str) -> "Batch":
        inputs = {k: fn(v) for k, v in self.inputs.items()} if isinstance(self.inputs, Mapping) else fn(self.inputs)
        return Batch(inputs, fn(self.targets), source)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """Move to ``device``; floating tensors take ``dtype``, integer ones (labels, token ids, masks) stay."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), self.source)

    def shard(self, parts: int, index: int) -> "Batch | None":
        """The ``index``-th of ``parts`` contiguous slices along the first dimension (None when empty)."""
        size, extra = divmod(self.num_examples, parts)
        start = index * size + min(index, extra)
        stop = start + size + (1 if index < extra else 0)
        if stop == start:
            return None
        return self._map(lambda t: t[start:stop], f"{self.source} [rank {index}]")

    def chunks(self, size: int) -> list["Batch"]:
        """Consecutive slices of at most ``size`` examples (the batch itself when it is no larger)."""
        if self.num_examples <= size:
            return [self]
        return [self._slice(a, size) for a in range(0, self.num_examples, size)]

    def head(self, size: int) -> "Batch":
        """The first ``size`` examples (the batch itself when it is no larger): ``chunks(size)[0]``, without
        making the other chunks."""
        return self if self.num_examples <= size else self._slice(0, size)

    def _slice(self, start: int, size: int) -> "Batch":
        end = min(start + size, self.num_examples)
        return self._map(lambda t: t[start:end], f"{self.source} [examples {start}:{end}]")


def load_batch(path: str | os.PathLike) -> Batch:
    """Load a batch file: ``inputs`` and ``targets``, or keyword arguments with ``labels`` (module docstring)."""
    tensors, _ = read_safetensors(path, "batch")
    if "inputs" in tensors or "targets" in tensors or not any(k in tensors for k in KWARGS_MARKERS):
        missing = [k for k in ("inputs", "targets") if k not in tensors]
        if missing:
            raise ZeroptimError(f"batch file '{path}' has no tensor '{missing[0]}' (it needs 'inputs' and 'targets', "
                                f"or a model's keyword arguments: {' or '.join(KWARGS_MARKERS)} with {LABELS})")
    elif LABELS not in tensors:
        raise ZeroptimError(f"batch file '{path}' has keyword arguments ({', '.join(tensors)}) but no '{LABELS}' "
                            "to score the model against")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ZeroptimError(f"batch file '{path}': tensor '{name}' contains NaN or Inf")
    if "inputs" in tensors:
        return Batch(tensors["inputs"], tensors["targets"], str(path))
    labels = tensors.pop(LABELS)
    return Batch(tensors, labels, str(path))


def save_batch(path: str | os.PathLike, inputs: torch.Tensor | Mapping[str, torch.Tensor],
               targets: torch.Tensor) -> Path:
    """Write a batch file atomically (keyword-argument inputs are saved beside ``labels``), as given: the
    checks are ``load_batch``'s."""
    tensors = {"inputs": inputs, "targets": targets} if isinstance(inputs, torch.Tensor) else {**inputs, LABELS: targets}
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp))
    return Path(path)
