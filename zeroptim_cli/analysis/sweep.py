"""Sweeps: analyse every recorded checkpoint pair of one or more run folders, resumably.

A run folder holds checkpoint files (``zeroptim train``, the ``Recorder``, the Trainer callback) or Hugging
Face ``checkpoint-N`` folders (a Trainer ``output_dir``, whose pairs need ``--batch``; a peft model's are
adapter folders, read on their base model: ``io.peft``), or both.

Each pair's result is one JSON line (the contract's object plus ``run``, ``ckpt_t``, ``ckpt_t1``,
``batches``, ``sweep_key`` and ``settings_key``), written and flushed as soon as it is computed.
Re-running with the same output skips the pairs already there and retries pairs that failed, so an
interrupted sweep resumes with no duplicate and no loss; results of other settings stay in the file. A
line that is not a row (cut short by a kill, edited by hand) is moved to ``<output>.rejected`` with one
warning, and a last row without its newline gets one before anything is appended. A result is keyed by
its checkpoints (path, size, modification time), the content of every batch it used (the recorded ones
too) and the settings, so that editing a batch makes its rows stale. A failing pair (an unreadable
checkpoint too) is recorded with an ``error`` key and the sweep goes on. Each checkpoint file is read once
per sweep, the next one while the current pair computes (streamed pairs, ``--stream`` or ``--max-memory``,
read their files tensor by tensor instead).
With a fixed ``--batch`` set, pairs run newest first so that f(w_t) of one pair serves as f(w_t1) of
the pair before it: one forward pass saved per pair.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import (
    Settings,
    analyze_checkpoints,
    analyze_lazily,
    open_streamed,
    recorded_batches,
    streaming_refusal,
)
from zeroptim_cli.analysis.compare import CompareOptions, compare_checkpoints
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch, load_batch
from zeroptim_cli.io.checkpoint import Checkpoint, load_checkpoint
from zeroptim_cli.io.files import LockedFile, file_digest, require_regular
from zeroptim_cli.io.hf import CONFIG, INDEX, TRAINER_STATE
from zeroptim_cli.io.layout import TRAINER_RUN_FOLDER, scan_run
from zeroptim_cli.io.peft import ADAPTER_CONFIG
from zeroptim_cli.io.results import sweep_lines, to_json


@dataclass(frozen=True)
class Pair:
    """Two checkpoints of one run, at steps ``step_t`` and ``step_t1``."""

    run: str
    ckpt_t: Path
    ckpt_t1: Path
    step_t: int | None
    step_t1: int | None
    batches: tuple[Path, ...] = ()
    """The batches ``ckpt_t`` records (used unless the sweep has fixed batches)."""


#: The files of a Hugging Face or adapter folder besides its weights that a result depends on.
HF_FILES = (CONFIG, INDEX, TRAINER_STATE, ADAPTER_CONFIG)


def _file_id(p: Path) -> list[Any]:
    if p.is_dir():  # a Hugging Face folder: the files the checkpoint is read from
        return [str(p.resolve()), [_file_id(f) for f in sorted(p.iterdir())
                                   if f.name in HF_FILES or f.suffix == ".safetensors"]]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _batch_id(p: Path) -> list[Any]:
    """A batch file's identity in a key: its resolved path and content hash (None for a file that cannot be
    read, which its reading then reports), hashed once per version of the file (``_digest``)."""
    try:
        st = p.stat()
        digest = _digest(str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        digest = None
    return [str(p.resolve()), digest]


@functools.lru_cache(maxsize=4096)
def _digest(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """The content hash of one version of a file (its inode, size and times name it: a file replaced or
    rewritten is another version), so that a sweep's two keys per pair, and each pair that shares a recorded
    batch, hash it once; a file that cannot be read raises (and is not remembered)."""
    digest = file_digest(Path(path))
    if digest is None:
        raise OSError(f"cannot read '{path}'")
    return digest


#: The settings a result's numbers depend on (``base``: the base model folder peft adapters are read on). The
#: others (the device, the chunk size, trust, streaming, the memory bound, and any setting added later unless
#: named here) give the same numbers and are no part of ``settings_key``.
KEYED = ("model", "loss", "dtype", "method", "train", "seed", "direction", "critical", "critical_tol", "base")
#: Settings of ``KEYED`` that change the numbers only when another is on: the tolerance of the critical search.
ONLY_WITH = {"critical_tol": "critical"}
#: What ``settings_key`` hashes first, so that a key of another formula can never coincide with one. A new
#: default of a setting in ``KEYED`` needs a new version (a setting at its default is left out of the key).
KEY_VERSION = 2
#: The settings that keys of version 1 (which had no version) hashed, the critical search's only when asked
#: for: every field ``Settings`` then had but the device, trust, streaming and the memory bound. Rows written
#: with such keys are resumed still (``legacy_settings_key``).
LEGACY_KEYED = ("model", "loss", "dtype", "method", "train", "seed", "direction", "chunk_size", "critical",
                "critical_tol")


def settings_key(settings: Settings, batch_paths: Sequence[Path], extras: Extras | None = None,
                 compare: CompareOptions | None = None) -> str:
    """What a result depends on besides its two checkpoints: ``KEY_VERSION``, the settings ``KEYED`` names,
    the fixed batches (resolved path, content hash), the extras (none: their defaults) and the comparison
    options. Settings, extras and options at their defaults are left out, so that a setting added to
    ``KEYED`` (or an extra, an option) whose default computes what was computed before leaves every key as
    it was."""
    keyed = {name: _value(settings, name) for name in KEYED
             if name not in ONLY_WITH or getattr(settings, ONLY_WITH[name])}
    parts = {"v": KEY_VERSION, "settings": _changed(keyed, {n: _value(Settings(), n) for n in KEYED}),
             "batches": _batch_ids(batch_paths),
             "extras": _changed((extras or Extras()).settings(), Extras().settings()),
             "compare": _changed(asdict(compare), asdict(CompareOptions())) if compare is not None else None}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def legacy_settings_key(settings: Settings, batch_paths: Sequence[Path], extras: Extras | None = None,
                        compare: CompareOptions | None = None) -> str | None:
    """``settings_key`` as version 1 made it (every setting ``LEGACY_KEYED`` names, the extras and options
    whole, no version), so that a sweep recognises the rows it wrote then as done; None when a setting of
    ``KEYED`` that version 1 did not know is not at its default (no row of then was computed so)."""
    default = Settings()
    if any(_value(settings, n) != _value(default, n) for n in KEYED if n not in LEGACY_KEYED):
        return None
    how = {name: _value(settings, name) for name in LEGACY_KEYED
           if settings.critical or name not in ("critical", "critical_tol")}
    parts = [how, _batch_ids(batch_paths), extras.settings() if extras is not None else None]
    if compare is not None:
        parts.append(asdict(compare))
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _value(settings: Settings, name: str) -> Any:
    """A setting as keys hold it: a dtype by its name (torch.float64 and "float64" are one dtype), the base
    folder by its resolved path (``--base ./llama`` and ``--base llama`` are one folder)."""
    if name == "dtype":
        return str(settings.torch_dtype).removeprefix("torch.")
    if name == "base" and settings.base is not None:
        return str(Path(settings.base).resolve())
    return getattr(settings, name)


def _changed(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are not those of ``defaults``."""
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def _batch_ids(paths: Sequence[Path]) -> list[list[Any]]:
    return [_batch_id(b) for b in paths]


def sweep_key(pair: Pair, how: str, fixed_batches: bool = False) -> str:
    """A result's identity: both checkpoint files (resolved path, size, modification time), the batches
    ``ckpt_t`` records unless the sweep has fixed ones (resolved path, content hash: the fixed ones are in
    ``how``) and the ``settings_key`` ``how``. A re-run skips a pair whose key is already in the output."""
    parts = [_file_id(pair.ckpt_t), _file_id(pair.ckpt_t1), how]
    if pair.batches and not fixed_batches:
        parts.append([_batch_id(b) for b in pair.batches])
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    """The pairs to analyse, and what was noticed while finding them (gaps, pairs without a batch)."""

    pairs: list[Pair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def expand(patterns: Sequence[str]) -> list[Path]:
    """Folders named directly or by glob patterns, in the order given. A pattern names the folders it
    matches: the files beside them (``runs/*`` also matches ``runs/results.jsonl``) are not runs."""
    folders: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(p for p in Path().glob(pattern) if p.is_dir())
        else:
            matches = [Path(pattern)]
        if not matches:
            raise ZeroptimError(f"run folder pattern '{pattern}' matches no folder")
        folders += matches
    return folders


def find_pairs(folders: Sequence[Path], successive: bool = False, fixed_batches: bool = False) -> Plan:
    """The pairs of each folder (its checkpoints: ``io.layout.scan_run``): a checkpoint s that records its
    batch with the checkpoint s+1 after its step (what the Recorder writes); with ``fixed_batches``
    (``--batch``) any two consecutive steps; with ``successive``, each checkpoint with the next one found.
    An unreadable checkpoint is paired by the number in its name, so that its pair fails; one without a
    number fails on its own. No pair at all in any folder is an error naming them and why (the notes)."""
    plan = Plan()
    names = [f.name for f in folders]
    for folder in folders:
        found = scan_run(folder)
        run = folder.name if names.count(folder.name) == 1 else str(folder)
        plan.pairs += [Pair(run, path, path, None, None) for path in found.unnumbered]
        steps = found.steps
        ordered = sorted(steps)
        gaps = unbatched = 0
        for s, s1 in zip(ordered, ordered[1:]):
            if not successive and s1 != s + 1:
                gaps += 1
            elif successive or fixed_batches or steps[s].batches or steps[s].error:
                plan.pairs.append(Pair(run, steps[s].path, steps[s1].path, s, s1, steps[s].batches))
            else:
                unbatched += 1
        if gaps:
            plan.notes.append(f"run '{run}': {gaps} gap(s) between recorded steps, no pair across them "
                              "(--successive pairs across gaps)")
        recorded = (f"; the steps recorded with their batches are in '{folder / TRAINER_RUN_FOLDER}'"
                    if (folder / TRAINER_RUN_FOLDER).is_dir() else "")
        if unbatched:
            plan.notes.append(f"run '{run}': {unbatched} consecutive pair(s) whose first checkpoint records no batch "
                              f"were not paired (--batch FILE analyses every consecutive pair on that batch{recorded})")
        if not any(p.run == run for p in plan.pairs):
            plan.notes.append(f"run '{run}': no pair among steps {ordered} (try --successive or --batch{recorded})")
    if not plan.pairs:
        raise ZeroptimError(f"no checkpoint pair to analyse in {', '.join(repr(str(f)) for f in folders)}: "
                            + "; ".join(plan.notes))
    return plan


def rejected_path(output: Path) -> Path:
    """Where the lines of ``output`` that are not rows are moved: ``<output>.rejected``."""
    return output.with_name(output.name + ".rejected")


def read_done(locked: LockedFile, current: dict[tuple[str, str], dict[str, str]], replace_stale: bool = False,
              force: bool = False) -> tuple[set[str], list[str]]:
    """(sweep keys of the pairs of ``current`` already analysed with these settings in the locked output,
    warnings). ``current`` maps each pair's resolved checkpoint paths to the settings keys its rows may carry
    (this version's first, then ``legacy_settings_key``'s), each with the pair's sweep key under it; a row of
    either counts as done, under the first. Nothing that is a result is lost: rows of other
    settings and of other pairs stay as they are. Dropped are only repeated lines and the error rows of
    pairs that are retried now; a line that is not a row is moved to ``rejected_path`` (with one warning),
    and a last line without its newline gets one. A row of these settings whose checkpoints or batches
    changed since is replaced only with ``replace_stale``; otherwise the sweep refuses. A file with no row
    at all is not a sweep output: refused unless ``force`` (its lines are then moved aside too)."""
    output = locked.path
    try:
        data = output.read_bytes()
    except OSError as exc:
        raise ZeroptimError(f"-o '{output}' cannot be read ({exc.strerror})") from exc
    lines = list(sweep_lines(data))
    if lines and all(row is None for _, row in lines) and not force:
        raise ZeroptimError(f"-o '{output}' exists and is not a zeroptim sweep output (no line of it is a sweep "
                            "row); choose another file, or pass --force to start it anew (its lines are kept in "
                            f"'{rejected_path(output)}')")
    kept: list[bytes] = []
    seen: set[bytes] = set()
    rejected: list[bytes] = []
    done: set[str] = set()
    stale, changed = 0, bool(data) and not data.endswith(b"\n")
    for line, row in lines:
        if row is None:
            rejected.append(line)
            continue
        paths = (str(Path(row["ckpt_t"]).resolve()), str(Path(row["ckpt_t1"]).resolve()))
        how = row.get("settings_key")
        expected = current.get(paths, {}).get(how) if isinstance(how, str) else None
        key, mine = row.get("sweep_key"), expected is not None
        if line in seen or (mine and "error" in row):
            changed = True  # a repeated line, or a failure retried now
            continue
        if mine and key != expected:
            if not replace_stale:
                stale += 1
            else:
                changed = True
                continue
        elif mine:
            done.add(next(iter(current[paths].values())))
        kept.append(line)
        seen.add(line)
    if stale:
        raise ZeroptimError(f"-o '{output}' holds {stale} result(s) of these settings computed from earlier versions "
                            "of the checkpoints or batches; pass --replace-stale to recompute and replace them")
    warnings = []
    if rejected:
        aside = rejected_path(output)
        require_regular(aside, "-o (its rejected lines)")
        try:
            with aside.open("ab") as f:
                f.write(b"".join(line + b"\n" for line in rejected))
        except OSError as exc:
            raise ZeroptimError(f"cannot write '{aside}' ({exc.strerror})") from exc
        warnings.append(f"{len(rejected)} line(s) of '{output}' are not sweep rows; moved to '{aside}'")
    if changed or rejected:
        locked.replace(b"".join(line + b"\n" for line in kept))
    return done, warnings


class CheckpointCache:
    """Loads each checkpoint once, the next pair's in a background thread while the current pair computes."""

    def __init__(self, base: Path | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: dict[Path, Future[Checkpoint]] = {}
        self._base = base

    def prefetch(self, path: Path) -> None:
        if path not in self._futures:
            self._futures[path] = self._pool.submit(load_checkpoint, path, self._base)

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
    """Counts of the pairs, and the first failed pair's error (what went wrong is usually the same)."""

    analysed: int = 0
    skipped: int = 0
    failed: int = 0
    first_error: str | None = None
    warnings: list[str] = field(default_factory=list)


def sweep(plan: Plan, output: Path, settings: Settings = Settings(), batch_paths: Sequence[Path] = (),
          extras: Extras | None = None, on_pair: Callable[[Pair, dict[str, Any]], None] | None = None,
          shard: str = "pairs", replace_stale: bool = False, force: bool = False,
          compare: CompareOptions | None = None) -> SweepSummary:
    """Analyse ``plan``'s pairs into ``output`` (JSON lines), skipping those already there (see
    ``read_done`` for what happens to the rows already in it, and ``replace_stale`` and ``force``).
    The output is locked for the whole sweep, on its identity: a second sweep on it, by whatever name (a
    symlink, a hard link), fails at once. With ``compare``, each
    row is instead the comparison of directions at the pair (``analysis.compare``).

    Under torchrun, ``shard="pairs"`` gives each rank a contiguous block of whole pairs, and rank 0
    writes every rank's rows round by round; ``shard="batches"`` analyses each pair on all ranks, its
    batches split between them. Only rank 0 touches ``output``.
    """
    if shard not in ("pairs", "batches"):
        raise ConfigError(f"--shard '{shard}' is not 'pairs' or 'batches'")
    refusal = streaming_refusal(settings, extras) if settings.stream else None
    if refusal is not None:
        raise ConfigError(f"--stream cannot be combined with {refusal}")
    main = dist.group_rank() == 0
    how = settings_key(settings, batch_paths, extras, compare)
    legacy = legacy_settings_key(settings, batch_paths, extras, compare)
    keys = {p: sweep_key(p, how, bool(batch_paths)) for p in plan.pairs}
    current = {(str(p.ckpt_t.resolve()), str(p.ckpt_t1.resolve())):
               {how: k, **({legacy: sweep_key(p, legacy, bool(batch_paths))} if legacy is not None else {})}
               for p, k in keys.items()}
    if main:
        require_regular(output, "-o")  # before opening it: a FIFO would block the open
    with LockedFile(output, f"sweep output '{output}'") if main else contextlib.nullcontext() as locked:
        done, warnings = dist.broadcast_from_main(read_done(locked, current, replace_stale, force)
                                                  if main else None)
        summary = _run(plan, output, settings, batch_paths, extras, on_pair, shard, keys, how, done, compare)
    summary.warnings = warnings
    return summary


def _run(plan: Plan, output: Path, settings: Settings, batch_paths: Sequence[Path], extras: Extras | None,
         on_pair: Callable[[Pair, dict[str, Any]], None] | None, shard: str, keys: dict[Pair, str], how: str,
         done: set[str], compare: CompareOptions | None) -> SweepSummary:
    """The sweep's loop, under the output's lock: analyse what is not done, one JSON line per pair."""
    main = dist.group_rank() == 0
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
    cache = CheckpointCache(settings.base_folder)
    try:
        out = output.open("a", encoding="utf-8") if main else None
    except OSError as exc:
        raise ZeroptimError(f"cannot write '{output}' ({exc.strerror})") from exc
    try:
        for i in range(per_rank if by_pairs else len(todo)):
            pair = mine[i] if i < len(mine) else None
            row = None
            if pair is not None:
                upcoming = mine[i + 1] if i + 1 < len(mine) else None
                with dist.local_only() if by_pairs else contextlib.nullcontext():
                    row = {**_analyse_one(pair, upcoming, cache, fixed, settings, losses, extras, compare),
                           "sweep_key": keys[pair], "settings_key": how}
            rows = dist.gather_to_main((pair, row)) if by_pairs else [(pair, row)]
            if out is None or rows is None:
                continue
            for p, r in rows:
                if p is None or r is None:
                    continue
                try:
                    out.write(to_json(r) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                except OSError as exc:  # a full disk, say: the rows before this one are kept
                    raise ZeroptimError(f"cannot write '{output}' ({exc.strerror or exc}); the rows written "
                                        "before are kept, and rerunning the same command resumes") from exc
                if "error" in r:
                    summary.failed += 1
                    if summary.first_error is None:
                        summary.first_error = f"{p.run} {p.step_t} → {p.step_t1}: {r['error']}"
                else:
                    summary.analysed += 1
                if on_pair is not None:
                    on_pair(p, r)
    finally:
        if out is not None:
            with contextlib.suppress(OSError):  # the error that matters was raised above
                out.close()
        cache.close()
    return summary


def _analyse_one(pair: Pair, upcoming: Pair | None, cache: CheckpointCache, fixed: list[Batch],
                 settings: Settings, losses: dict[Path, float], extras: Extras | None,
                 compare: CompareOptions | None) -> dict[str, Any]:
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
        lazy = open_streamed(pair.ckpt_t, pair.ckpt_t1, settings, extras) if compare is None else None
        if lazy is not None:  # streamed: the files are read tensor by tensor, never whole
            batches = fixed or recorded_batches(lazy[0][0])
            row["batches"] = [b.source for b in batches]
            result = analyze_lazily(*lazy, batches, settings, loss_t1=losses.get(pair.ckpt_t1))
        else:
            ckpt_t, ckpt_t1, batches = dist.guarded(load)
            row["batches"] = [b.source for b in batches]
            if compare is not None:
                return {**compare_checkpoints(ckpt_t, ckpt_t1, batches, settings, compare).to_dict(), **row}
            result = analyze_checkpoints(ckpt_t, ckpt_t1, batches, settings, loss_t1=losses.get(pair.ckpt_t1),
                                         extras=extras)
        if fixed:
            losses[pair.ckpt_t] = result.loss_t
        return {**result.to_dict(), **row}
    except ZeroptimError as exc:
        return {**row, "step_t": pair.step_t, "step_t1": pair.step_t1, "error": str(exc)}
