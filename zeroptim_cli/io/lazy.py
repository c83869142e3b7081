"""Checkpoints read on demand, tensor by tensor: for pairs larger than memory.

``open_lazily`` reads only the headers of a checkpoint file, or of a Hugging Face folder's
``model.safetensors`` or shards (``model.safetensors.index.json``): it returns the same ``Checkpoint`` as
``load_checkpoint`` (metadata, step, model spec), whose tensors are *meta* tensors of the stored names,
shapes and dtypes (enough for every check of the pair and for matching a model), and a ``TensorFiles``
that reads one stored tensor's data when asked (``safetensors.safe_open``, the file mapped only for that
read), checks it is finite and converts it to the run's device and dtype.

The names are the stored ones: a Hugging Face folder whose keys transformers renames while loading (legacy
names) does not match its model here, and says which weight it lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.checkpoint import Checkpoint, parse_metadata
from zeroptim_cli.io.files import read_header
from zeroptim_cli.io.hf import CONFIG, INDEX, WEIGHTS, folder_metadata, is_hf_folder, shard_files

#: About the bytes of stored data converted at a time (``TensorFiles.read``).
SLICE_BYTES = 16 * 2**20
#: safetensors' dtype names.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class TensorFiles:
    """Where each stored tensor of one checkpoint lies; ``read`` loads one."""

    def __init__(self, path: Path, files: dict[str, Path], meta_tensors: dict[str, torch.Tensor]) -> None:
        self.path, self.files, self.tensors = path, files, meta_tensors
        self._key = {id(t): name for name, t in meta_tensors.items()}

    def key(self, stored: torch.Tensor) -> str:
        """The stored name of one of this checkpoint's meta tensors (tied weights are stored once)."""
        return self._key[id(stored)]

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             minus: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor ``name`` on ``device``, floating tensors in ``dtype`` (None: as stored), less
        ``minus`` when given (w_t1 − w_t formed as w_t1 is read). Read in slices of about ``SLICE_BYTES`` rows
        each, so that the conversion holds one slice beside the result, not a second whole tensor; the result is
        exactly that of converting (and subtracting) the whole tensor. Exactly that also when called inside a
        model's forward under a torch function mode: no mode sees the read."""
        with torch._C.DisableTorchFunction():
            return self._read(name, torch.device(device), dtype, minus)

    def _read(self, name: str, device: torch.device, dtype: torch.dtype | None,
              minus: torch.Tensor | None) -> torch.Tensor:
        file = self.files[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                stored = self.tensors[name]
                floating = stored.is_floating_point()
                target = (dtype or stored.dtype) if floating else stored.dtype
                if stored.dim() == 0 or stored.numel() * stored.element_size() <= SLICE_BYTES:
                    return self._checked(f.get_tensor(name), name, device, target, minus)
                out = torch.empty(stored.shape, dtype=target, device=device)
                whole = f.get_slice(name)
                step = max(1, SLICE_BYTES * stored.shape[0] // (stored.numel() * stored.element_size()))
                for i in range(0, stored.shape[0], step):
                    part = minus[i:i + step] if minus is not None else None
                    out[i:i + step] = self._checked(whole[i:i + step], name, device, target, part)
                return out
        except ZeroptimError:
            raise
        except Exception as exc:  # safetensors raises several types for truncated or rewritten files
            raise ZeroptimError(f"checkpoint file '{file}' cannot be read at tensor '{name}' ({exc})") from exc

    def _checked(self, tensor: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype,
                 minus: torch.Tensor | None) -> torch.Tensor:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ZeroptimError(f"checkpoint '{self.path}': tensor '{name}' contains NaN or Inf")
        tensor = tensor.to(device=device, dtype=dtype)
        return tensor if minus is None else tensor - minus

    def nbytes(self) -> int:
        """The bytes of every stored tensor, as stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _entries(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The meta tensors a safetensors file's header describes, and its string metadata."""
    header, metadata = read_header(file, "checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None or not isinstance(entry.get("shape"), list):
            raise ZeroptimError(f"checkpoint file '{file}': tensor '{name}' has an unreadable header entry")
        tensors[name] = torch.empty(entry["shape"], dtype=dtype, device="meta")
    return tensors, metadata


def open_lazily(path: str | os.PathLike) -> tuple[Checkpoint, TensorFiles]:
    """A checkpoint file or Hugging Face folder, its headers read, its data left in the files."""
    p = Path(path)
    if p.is_dir():
        if not is_hf_folder(p):
            raise ZeroptimError(f"checkpoint '{p}' is a directory, but not a Hugging Face checkpoint folder "
                                f"('{CONFIG}' with '{WEIGHTS}' or '{INDEX}')")
        _, meta = folder_metadata(p)
        files = shard_files(p)
        tensors: dict[str, torch.Tensor] = {}
        where: dict[str, Path] = {}
        for file in sorted(set(files.values())) or [p / WEIGHTS]:
            found, _ = _entries(file)
            tensors.update(found)
            where.update(dict.fromkeys(found, file))
        missing = sorted(set(files) - set(where))
        if missing:
            raise ZeroptimError(f"'{p / INDEX}' names '{missing[0]}', which its shard does not hold")
    else:
        tensors, raw = _entries(p)
        meta = parse_metadata(raw, p)
        where = dict.fromkeys(tensors, p)
    if not tensors:
        raise ZeroptimError(f"checkpoint '{p}' holds no tensors")
    return Checkpoint(p, tensors, meta), TensorFiles(p, where, tensors)
