"""Checkpoints read on demand, tensor by tensor: for pairs larger than memory.

``open_lazily`` reads only the headers of a checkpoint file, or of a Hugging Face folder's
``model.safetensors`` or shards (``model.safetensors.index.json``): it returns the same ``Checkpoint`` as
``load_checkpoint`` (metadata, step, model spec), whose tensors are *meta* tensors of the stored names,
shapes and dtypes (enough for every check of the pair and for matching a model), and a ``TensorFiles``
that reads one stored tensor's data when asked, checks it is finite and converts it to the run's device and
dtype. The data is read with plain reads at the offsets the header gives, slice by slice, never memory-mapped:
a mapped file's pages would count as the process's resident memory while it is mapped (a whole shard's worth),
and a file rewritten under a mapping turns into a SIGBUS instead of an error.

The names are the stored ones: a Hugging Face folder whose keys transformers renames while loading (legacy
names) does not match its model here, and says which weight it lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.checkpoint import Checkpoint
from zeroptim_cli.io.files import all_finite, read_header
from zeroptim_cli.io.hf import INDEX, WEIGHTS, check_spec_blocks, check_weights, folder_metadata, require_hf_folder
from zeroptim_cli.io.layout import parse_metadata

#: About the bytes of stored data converted at a time (``TensorFiles.read``).
SLICE_BYTES = 16 * 2**20
#: safetensors' dtype names.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class TensorFiles:
    """Where each stored tensor of one checkpoint lies (file, offset of its data); ``read`` loads one."""

    def __init__(self, path: Path, where: dict[str, tuple[Path, int]], meta_tensors: dict[str, torch.Tensor]) -> None:
        self.path, self.where, self.tensors = path, where, meta_tensors
        self._key = {id(t): name for name, t in meta_tensors.items()}

    def key(self, stored: torch.Tensor) -> str:
        """The stored name of one of this checkpoint's meta tensors (tied weights are stored once)."""
        return self._key[id(stored)]

    def read(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             minus: torch.Tensor | None = None, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor ``name`` on ``device``, floating tensors in ``dtype`` (None: as stored), less
        ``minus`` when given (w_t1 − w_t formed as w_t1 is read; ``minus`` has the result's shape). ``rows``:
        only these rows (first-dimension indices) — a ``slice`` with step 1, or sorted distinct indices — read
        as runs of consecutive rows. Read in slices of about ``SLICE_BYTES`` of rows, so that the conversion
        holds one slice beside the result, not a second whole tensor; the result is exactly that of converting
        (and subtracting) the whole tensor and then indexing it. Exactly that also when called inside a model's
        forward under a torch function mode: no mode sees the read."""
        with torch._C.DisableTorchFunction():
            return self._read(name, torch.device(device), dtype, minus, rows)

    def _read(self, name: str, device: torch.device, dtype: torch.dtype | None, minus: torch.Tensor | None,
              rows: slice | torch.Tensor | None) -> torch.Tensor:
        file, offset = self.where[name]
        stored = self.tensors[name]
        target = (dtype or stored.dtype) if stored.is_floating_point() else stored.dtype
        total = stored.shape[0] if stored.dim() else 1
        runs = _runs(rows, total)
        shape = (sum(n for _, n in runs), *stored.shape[1:]) if stored.dim() else stored.shape
        out = torch.empty(shape, dtype=target, device=device)
        if out.numel() == 0:
            return out
        row_bytes = stored.numel() * stored.element_size() // total
        step = max(1, SLICE_BYTES // row_bytes)
        flat = out.view(shape[0], -1) if stored.dim() else out.view(1)
        less = None if minus is None else (minus.reshape(shape[0], -1) if stored.dim() else minus.reshape(1))
        # w_t1 − w_t formed in one pass into ``out`` where the stored values convert exactly to the run's dtype
        # (the subtraction then promotes them as the conversion would); else converted first, then subtracted
        exact = device.type == "cpu" and torch.promote_types(stored.dtype, target) == target
        buf = bytearray(min(step, max(n for _, n in runs)) * row_bytes)  # one buffer for every slice
        at = 0  # the row of ``out`` the next part goes to
        try:
            with file.open("rb") as f:
                for first, count in runs:
                    for i in range(first, first + count, step):
                        n = min(step, first + count - i)
                        f.seek(offset + i * row_bytes)
                        if f.readinto(memoryview(buf)[:n * row_bytes]) != n * row_bytes:
                            raise ZeroptimError(f"checkpoint file '{file}' is shorter than its header says at "
                                                f"tensor '{name}'")
                        part = torch.frombuffer(buf, dtype=stored.dtype, count=n * row_bytes // stored.element_size())
                        if part.is_floating_point() and not all_finite(part):
                            raise ZeroptimError(f"checkpoint '{self.path}': tensor '{name}' contains NaN or Inf")
                        part = part.view(n, -1) if stored.dim() else part
                        dst = flat[at:at + n]
                        if less is None:
                            dst.copy_(part)
                        elif exact:
                            torch.sub(part, less[at:at + n], out=dst)
                        else:
                            torch.sub(part.to(device=device, dtype=target), less[at:at + n], out=dst)
                        at += n
        except OSError as exc:
            raise ZeroptimError(f"checkpoint file '{file}' cannot be read ({exc.strerror})") from exc
        return out

    def nbytes(self) -> int:
        """The bytes of every stored tensor, as stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _runs(rows: slice | torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """(first row, count) of each run of consecutive rows that ``rows`` selects out of ``total``."""
    if rows is None:
        return [(0, total)]
    if isinstance(rows, slice):
        start, stop, step = rows.indices(total)
        if step != 1:
            raise ValueError("rows: a slice of step 1")
        return [(start, max(0, stop - start))]
    index = rows.tolist()
    if index and (index[0] < 0 or index[-1] >= total):
        raise IndexError(f"row index out of range for a tensor of {total} rows")
    runs: list[list[int]] = []
    for i in index:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


def _entries(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """The meta tensors a safetensors file's header describes, the offset of each one's data in the file,
    and the file's string metadata; entries whose byte range does not fit their shape or the file are errors."""
    header, metadata = read_header(file, "checkpoint")
    with file.open("rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    size = file.stat().st_size
    tensors: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape, span = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        ok = (dtype is not None and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
              and isinstance(span, list) and len(span) == 2 and all(isinstance(o, int) for o in span))
        if ok:
            tensor = torch.empty(shape, dtype=dtype, device="meta")
            ok = span[1] - span[0] == tensor.numel() * tensor.element_size() and 0 <= span[0] and start + span[1] <= size
        if not ok:
            raise ZeroptimError(f"checkpoint file '{file}' is not a readable safetensors file "
                                f"(tensor '{name}' has an unreadable header entry)")
        tensors[name], offsets[name] = tensor, start + span[0]
    return tensors, offsets, metadata


def open_lazily(path: str | os.PathLike) -> tuple[Checkpoint, TensorFiles]:
    """A checkpoint file or Hugging Face folder, its headers read, its data left in the files."""
    p = Path(path)
    if p.is_dir():
        require_hf_folder(p)
        files = check_weights(p)  # tensor → shard
        _, meta = folder_metadata(p, files)
        tensors: dict[str, torch.Tensor] = {}
        where: dict[str, tuple[Path, int]] = {}
        for file in sorted(set(files.values())) or [p / WEIGHTS]:
            found, offsets, _ = _entries(file)
            tensors.update(found)
            where.update({name: (file, offsets[name]) for name in found})
        missing = sorted(set(files) - set(where))
        if missing:
            raise ZeroptimError(f"'{p / INDEX}' names '{missing[0]}', which its shard does not hold")
    else:
        tensors, offsets, raw = _entries(p)
        meta = parse_metadata(raw, p)
        check_spec_blocks(meta, len(tensors), p)
        where = {name: (p, offsets[name]) for name in tensors}
    if not tensors:
        raise ZeroptimError(f"checkpoint '{p}' holds no tensors")
    return Checkpoint(p, tensors, meta), TensorFiles(p, where, tensors)
