"""Sweeps: analyse every consecutive checkpoint pair of one or more run folders, resumably.

A run folder holds checkpoint files (``zeroptim train``, the ``Recorder``, the Trainer callback) or Hugging
Face ``checkpoint-N`` folders (a Trainer ``output_dir``), or both.

Each pair's result is one JSON line (the contract's object plus ``run``, ``ckpt_t``, ``ckpt_t1`` and
``batches``), written and flushed as soon as it is computed. Re-running with the same output skips the
pairs already there, drops a line cut short by a kill, and retries pairs that failed, so an interrupted
sweep resumes with no duplicate and no loss. A failing pair is recorded with an ``error`` key and the sweep
goes on. Each checkpoint file is read once per sweep, the next one while the current pair computes.
With a fixed ``--batch`` set, pairs run newest first so that f(w_t) of one pair serves as f(w_t1) of
the pair before it: one forward pass saved per pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import Settings, analyze_checkpoints, recorded_batches
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch, load_batch
from zeroptim_cli.io.checkpoint import METADATA_KEY, Checkpoint, load_checkpoint
from zeroptim_cli.io.files import write_text_atomic
from zeroptim_cli.io.hf import CONFIG, INDEX, TRAINER_STATE, folder_step, is_hf_folder
from zeroptim_cli.io.results import to_json

_NUMBER = re.compile(r"(\d+)(?!.*\d)")
#: The files of a Hugging Face folder besides its weights that a result depends on.
HF_FILES = (CONFIG, INDEX, TRAINER_STATE)


@dataclass(frozen=True)
class Pair:
    """Two checkpoints of one run, at steps ``step_t`` and ``step_t1``."""

    run: str
    ckpt_t: Path
    ckpt_t1: Path
    step_t: int
    step_t1: int



def sweep_key(pair: Pair, settings: Settings, batch_paths: Sequence[Path], extras: Extras | None = None) -> str:
    """What a result depends on: both files (resolved path, size, modification time), the settings and
    the fixed batches and extras (not the device). A re-run recomputes a pair whose key changed, e.g. a
    checkpoint written anew."""

    def file_id(p: Path) -> list[Any]:
        if p.is_dir():  # a Hugging Face folder: the files the checkpoint is read from
            return [str(p.resolve()), [file_id(f) for f in sorted(p.iterdir()) if f.name in HF_FILES or
                                       f.suffix == ".safetensors"]]
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    how = {k: v for k, v in asdict(settings).items() if k != "device"}  # same numbers on any device
    parts = [file_id(pair.ckpt_t), file_id(pair.ckpt_t1), how, [file_id(b) for b in batch_paths],
             asdict(extras) if extras is not None else None]
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    """The pairs to analyse, and what was noticed while finding them (gaps, unreadable files)."""

    pairs: list[Pair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint file from its metadata, else the last number in its name; None for a
    file that is a batch or an optimizer state rather than a checkpoint. A Hugging Face folder's step is
    ``io.hf.folder_step``'s."""
    if path.is_dir():
        return folder_step(path)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
    if keys == {"inputs", "targets"} or path.name.startswith(("batch_", "optim_")):
        return None
    if METADATA_KEY in meta:
        try:
            step = json.loads(meta[METADATA_KEY]).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None
        if isinstance(step, int):
            return step
    match = _NUMBER.search(path.stem)
    return int(match.group(1)) if match else None


def expand(patterns: Sequence[str]) -> list[Path]:
    """Folders named directly or by glob patterns, in the order given."""
    folders: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path().glob(pattern)) if any(c in pattern for c in "*?[") else [Path(pattern)]
        if not matches:
            raise ZeroptimError(f"run folder pattern '{pattern}' matches nothing")
        folders += matches
    return folders


def find_pairs(folders: Sequence[Path], successive: bool = False) -> Plan:
    """Pairs (s, s+1) of each folder — or, with ``successive``, each checkpoint and the next one found."""
    plan = Plan()
    names = [f.name for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise ZeroptimError(f"run folder '{folder}' is not a directory")
        steps: dict[int, Path] = {}
        candidates = sorted(folder.glob("*.safetensors")) + sorted(p for p in folder.iterdir() if is_hf_folder(p))
        for path in candidates:
            try:
                step = checkpoint_step(path)
            except Exception as exc:  # unreadable header: report it, keep sweeping the rest
                plan.notes.append(f"'{path}' is not a readable safetensors file ({exc}); skipped")
                continue
            if step is None:
                continue
            if step in steps:
                raise ZeroptimError(f"run folder '{folder}': '{steps[step].name}' and '{path.name}' are both step {step}")
            steps[step] = path
        if not steps:
            raise ZeroptimError(f"run folder '{folder}' holds no checkpoints (*.safetensors with a step, or "
                                "Hugging Face checkpoint-N folders)")
        run = folder.name if names.count(folder.name) == 1 else str(folder)
        ordered = sorted(steps)
        found = 0
        for s, s1 in zip(ordered, ordered[1:]):
            if successive or s1 == s + 1:
                plan.pairs.append(Pair(run, steps[s], steps[s1], s, s1))
                found += 1
            else:
                plan.notes.append(f"run '{run}': steps {s} → {s1} are not consecutive; no pair there")
        if not found:
            plan.notes.append(f"run '{run}': no consecutive pair among steps {ordered} (try --successive)")
    return plan


def read_done(output: Path, current: dict[tuple[str, str], str]) -> set[str]:
    """Sweep keys of the pairs already analysed in ``output``, which is rewritten without failed lines,
    lines cut short, repeated keys, and stale results: pairs of ``current`` (resolved checkpoint paths →
    key) whose stored key differs, because a file or a setting changed since."""
    if not output.exists():
        return set()
    kept, done = [], set()
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(row, dict) or "error" in row or "sweep_key" not in row:
            continue
        key = row["sweep_key"]
        paths = (str(Path(row["ckpt_t"]).resolve()), str(Path(row["ckpt_t1"]).resolve()))
        if key in done or current.get(paths, key) != key:
            continue
        done.add(key)
        kept.append(line)
    write_text_atomic(output, "".join(k + "\n" for k in kept))
    return done


class CheckpointCache:
    """Loads each checkpoint once, the next pair's in a background thread while the current pair computes."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: dict[Path, Future[Checkpoint]] = {}

    def prefetch(self, path: Path) -> None:
        if path not in self._futures:
            self._futures[path] = self._pool.submit(load_checkpoint, path)

    def get(self, path: Path) -> Checkpoint:
        self.prefetch(path)
        return self._futures[path].result()

    def retain(self, paths: Sequence[Path]) -> None:
        """Forget every checkpoint but ``paths``."""
        for stale in [p for p in self._futures if p not in paths]:
            del self._futures[stale]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SweepSummary:
    analysed: int = 0
    skipped: int = 0
    failed: int = 0


def sweep(plan: Plan, output: Path, settings: Settings = Settings(), batch_paths: Sequence[Path] = (),
          extras: Extras | None = None, on_pair: Callable[[Pair, dict[str, Any]], None] | None = None,
          shard: str = "pairs") -> SweepSummary:
    """Analyse ``plan``'s pairs into ``output`` (JSON lines), skipping those already there.

    Under torchrun, ``shard="pairs"`` gives each rank a contiguous block of whole pairs, and rank 0
    writes every rank's rows round by round; ``shard="batches"`` analyses each pair on all ranks, its
    batches split between them. Only rank 0 touches ``output``.
    """
    if shard not in ("pairs", "batches"):
        raise ConfigError(f"--shard '{shard}' is not 'pairs' or 'batches'")
    main = dist.group_rank() == 0
    keys = {p: sweep_key(p, settings, batch_paths, extras) for p in plan.pairs}
    current = {(str(p.ckpt_t.resolve()), str(p.ckpt_t1.resolve())): k for p, k in keys.items()}
    done = dist.broadcast_from_main(read_done(output, current) if main else None)
    todo = [p for p in plan.pairs if keys[p] not in done]
    summary = SweepSummary(skipped=len(plan.pairs) - len(todo))
    fixed = dist.guarded(lambda: [load_batch(p) for p in batch_paths])
    if fixed:  # newest pair first: its f(w_t) is then the f(w_t1) of the pair before, saving a forward pass
        todo.reverse()
    by_pairs = shard == "pairs" and dist.group_size() > 1
    ranks = dist.group_size() if by_pairs else 1
    per_rank = -(-len(todo) // ranks) if todo else 0
    mine = todo[dist.group_rank() * per_rank:(dist.group_rank() + 1) * per_rank] if by_pairs else todo
    losses: dict[Path, float] = {}
    cache = CheckpointCache()
    out = output.open("a", encoding="utf-8") if main else None
    try:
        for i in range(per_rank if by_pairs else len(todo)):
            pair = mine[i] if i < len(mine) else None
            row = None
            if pair is not None:
                upcoming = mine[i + 1] if i + 1 < len(mine) else None
                with dist.local_only() if by_pairs else contextlib.nullcontext():
                    row = {**_analyse_one(pair, upcoming, cache, fixed, settings, losses, extras),
                           "sweep_key": keys[pair]}
            rows = dist.gather_to_main((pair, row)) if by_pairs else [(pair, row)]
            if out is None or rows is None:
                continue
            for p, r in rows:
                if p is None or r is None:
                    continue
                out.write(to_json(r) + "\n")
                out.flush()
                os.fsync(out.fileno())
                if "error" in r:
                    summary.failed += 1
                else:
                    summary.analysed += 1
                if on_pair is not None:
                    on_pair(p, r)
    finally:
        if out is not None:
            out.close()
        cache.close()
    return summary


def _analyse_one(pair: Pair, upcoming: Pair | None, cache: CheckpointCache, fixed: list[Batch],
                 settings: Settings, losses: dict[Path, float], extras: Extras | None) -> dict[str, Any]:
    """One pair's row; with fixed batches, f(w) of each checkpoint is kept in ``losses`` for reuse."""
    row: dict[str, Any] = {"run": pair.run, "ckpt_t": str(pair.ckpt_t), "ckpt_t1": str(pair.ckpt_t1)}
    following = [upcoming.ckpt_t, upcoming.ckpt_t1] if upcoming else []

    def load() -> tuple[Checkpoint, Checkpoint, list[Batch]]:
        ckpt_t, ckpt_t1 = cache.get(pair.ckpt_t), cache.get(pair.ckpt_t1)
        cache.retain(following)
        for path in following:
            cache.prefetch(path)
        return ckpt_t, ckpt_t1, fixed or recorded_batches(ckpt_t)

    try:
        ckpt_t, ckpt_t1, batches = dist.guarded(load)
        result = analyze_checkpoints(ckpt_t, ckpt_t1, batches, settings, loss_t1=losses.get(pair.ckpt_t1),
                                     extras=extras)
        if fixed:
            losses[pair.ckpt_t] = result.loss_t
        row["batches"] = [b.source for b in batches]
        return {**result.to_dict(), **row}
    except ZeroptimError as exc:
        return {**row, "step_t": pair.step_t, "step_t1": pair.step_t1, "error": str(exc)}
