"""Running under ``torchrun``: one process per rank, the evaluation split across ranks, exact sums.

Each batch is cut into WORLD_SIZE contiguous shards along its first dimension; rank r evaluates shard r
of every batch, weighting it by its count over the global count N = Σ_b n_b, so that the all-reduced sums
Σ_ranks Σ_shards (n_s / N)·(ℓ_s, ∇ℓ_s, ∇²ℓ_s·Δ) equal the single-process f, g and HΔ up to round-off.
(Train-mode BatchNorm is the exception: its statistics are then per shard.) Rank 0 alone prints and
writes. Before any collective that follows work which can fail, the ranks exchange their errors, so that
one rank's bad file makes every rank stop with the same message instead of leaving the others waiting.

Backends: NCCL on GPUs, one device per local rank (``LOCAL_RANK``); gloo on CPU. Without torchrun's
environment nothing here is used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.batches import Batch

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_local_only = False


def active() -> bool:
    """Whether collectives are in use: a process group of several ranks, outside ``local_only``."""
    return not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Compute on this rank alone (a whole sweep pair per rank): no sharding, no collectives."""
    global _local_only
    saved, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = saved


def group_rank() -> int:
    """This process's rank in the process group, even inside ``local_only``."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device_spec: str) -> str:
    """Start the process group if launched; returns the device spec this rank should use."""
    if not launched() or active():
        return device_spec
    _bind_group_defaults_first()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return "cpu"


def _bind_group_defaults_first() -> None:
    """Import ``torch.distributed.nn`` before the process group exists.

    Its functions take ``group=group.WORLD`` as default arguments, bound when the module is imported, and
    ``torch._dynamo`` (which torch.func imports on first use) imports it. Imported after
    ``init_process_group``, those defaults hold the group itself, so ``destroy_process_group`` cannot free
    it: its gloo threads outlive the interpreter's finalization and abort the process (``terminate called
    without an active exception``) after its results were written. Imported first, they hold ``None``
    (``group.WORLD`` before any group exists), which torch reads as the default group at each call.
    """
    import torch.distributed.nn  # noqa: F401 - imported for when its defaults are bound


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def shard(batches: Sequence[Batch]) -> tuple[list[Batch], int]:
    """This rank's contiguous shard of every batch, and the global count of examples."""
    total = sum(b.num_examples for b in batches)
    if not active():
        return list(batches), total
    r, k = rank(), world_size()
    out = [part for part in (b.shard(k, r) for b in batches) if part is not None]
    if not out:
        raise ZeroptimError(f"rank {r} has no examples: the batches hold {total}, fewer than the {k} ranks")
    return out, total


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank the first rank's error, if any rank had one."""
    if not active():
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, (kind, text) = failed[0]
        if error is not None and rank() == r:
            raise error
        raise ZeroptimError(text if kind in ("ZeroptimError", "ConfigError") else f"rank {r}: {kind}: {text}")


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then ``agree``: all ranks succeed, or all raise the same error."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank by agree
        agree(exc)
        raise
    agree(None)
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (identity without torchrun)."""
    if active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size() if is_main() else None  # type: ignore[assignment]
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
