"""The on-disk layout of a recorded run: the names of its files, their ``zeroptim`` metadata, and the scan
of a run folder for its checkpoints.

A run folder (the ``Recorder``'s, ``zeroptim train``'s, the Trainer callback's) holds, for a recorded step s::

    ckpt_{s:06d}.safetensors       the weights just before the step (ckpt_{s+1:06d}: just after it)
    batch_{s:06d}.safetensors      the batch the step used, or
    batch_{s:06d}_{i}.safetensors  its micro-batch i, when the step accumulated several
    optim_{s:06d}.safetensors      the optimizer's state just before the step

and ``run.json`` (the Recorder's); the Trainer callback's is ``{output_dir}/zeroptim`` by default. Every kind of file is one ``Kind`` of ``KINDS``: its name, the parsing of a
name back to its step, the files a run owns (``run_files``) and what the scan of a run folder passes over
all come from that table. A peft model's run (the Trainer callback's) also holds ``base.safetensors``
(``BASE_FILE``): the frozen base weights, saved once (metadata ``role`` ``base``, ``BASE_ROLE``), which each
of its checkpoints names (metadata ``base``) and leaves out; the scan passes over it.

Metadata: a file zeroptim writes stores it under the safetensors metadata key ``zeroptim``, a JSON object
``{"format": 1, …, "versions": {"zeroptim": …, "torch": …, "python": …}}`` (``encode_metadata``; ``versions``
says what wrote the file, readers never need it). A checkpoint's keys are docs/contract.md's
(``parse_metadata``); it names the batches of its step (``batch`` for one, ``batches`` for several: files in
its folder, ``batch_entry`` / ``recorded_batch_paths``), which hold no metadata of their own. An optimizer
state's keys are ``step``, ``optimizer`` (its description), ``param_groups`` (the groups that differ in a
hyper-parameter) and, when they are several, ``groups`` (each group's parameter names and hyper-parameters)
(``state_metadata`` / ``parse_state_metadata``). An optimizer description (a checkpoint's or a state's) may
hold ``gradient_scale`` c (``GRADIENT_SCALE``): the step was taken along c·∇f, f the mean over the step's
batches (Trainer's sum of micro-batch means, c = k).
"""

from __future__ import annotations

import fnmatch
import json
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from zeroptim_cli._version import __version__
from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import leads_out, loads_json, read_header
from zeroptim_cli.io.hf import SPEC_KEY, folder_step, is_hf_folder
from zeroptim_cli.io.peft import PEFT_KEY, is_adapter_folder

METADATA_KEY = "zeroptim"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
RUN_FILE = "run.json"
#: The run folder the Trainer callback records into, inside Trainer's ``output_dir`` (unless told another).
TRAINER_RUN_FOLDER = "zeroptim"
#: Trainer's own optimizer state in its ``checkpoint-N`` folders: a pickle, never opened (the callback saves ours).
TRAINER_OPTIMIZER_FILE = "optimizer.pt"
#: The recorded base of a peft model: its frozen weights, saved once for all its checkpoints.
BASE_FILE = "base.safetensors"
#: The ``role`` in the metadata of a recorded base (``io.checkpoint.save_base``): frozen weights, not a checkpoint.
BASE_ROLE = "base"


@dataclass(frozen=True)
class Kind:
    """A kind of file of a recorded run, named ``{prefix}_{step:06d}[_{index}].safetensors``; ``what`` is how
    messages name such a file, ``indexed`` whether several may belong to one step."""

    prefix: str
    what: str
    indexed: bool = False

    def name(self, step: int, index: int | None = None) -> str:
        if index is not None and not self.indexed:
            raise ValueError(f"{self.what} files have no index")
        return f"{self.prefix}_{step:06d}{'' if index is None else f'_{index}'}{SUFFIX}"

    @property
    def pattern(self) -> str:
        """The glob pattern of every file of this kind (also of names ``name`` does not give)."""
        return f"{self.prefix}_*{SUFFIX}"


CHECKPOINT = Kind("ckpt", "checkpoint")
BATCH = Kind("batch", "batch", indexed=True)
STATE = Kind("optim", "optimizer state")
KINDS = (CHECKPOINT, BATCH, STATE)


def ckpt_name(step: int) -> str:
    """The checkpoint of the weights after ``step`` steps."""
    return CHECKPOINT.name(step)


def batch_name(step: int, index: int | None = None) -> str:
    """The batch of step ``step`` (``index``: its micro-batch of that number)."""
    return BATCH.name(step, index)


def state_name(step: int) -> str:
    """The optimizer state recorded beside checkpoint ``step``, just before the step."""
    return STATE.name(step)


class Named(NamedTuple):
    """What a file name says: its kind, its step and (micro-batches) its index."""

    kind: Kind
    step: int
    index: int | None = None


_NAME = re.compile(rf"({'|'.join(k.prefix for k in KINDS)})_(\d+)(?:_(\d+))?{re.escape(SUFFIX)}")
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def parse_name(name: str) -> Named | None:
    """The kind and step of a file named as ``Kind.name`` names it (exactly: ``ckpt_12.safetensors`` is
    not), else None."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    kind = next(k for k in KINDS if k.prefix == match.group(1))
    step, index = int(match.group(2)), None if match.group(3) is None else int(match.group(3))
    if index is not None and not kind.indexed:
        return None
    return Named(kind, step, index) if kind.name(step, index) == name else None


def step_in_name(path: Path) -> int | None:
    """The step a file's name gives: ``parse_name``'s, else (names of other tools, ``checkpoint-N``) the last
    number in it; None when it has none."""
    named = parse_name(path.name)
    if named is not None:
        return named.step
    match = _LAST_NUMBER.search(path.stem)
    return int(match.group(1)) if match else None


def kind_of(name: str) -> Kind | None:
    """The kind whose ``pattern`` ``name`` matches, None for any other file."""
    return next((k for k in KINDS if fnmatch.fnmatchcase(name, k.pattern)), None)


def run_files(folder: Path) -> list[Path]:
    """The files of a recorded run in ``folder``: every file of a kind of ``KINDS``, ``run.json`` and a
    recorded base."""
    return sorted(p for pattern in [*(k.pattern for k in KINDS), RUN_FILE, BASE_FILE] for p in folder.glob(pattern))


def versions() -> dict[str, str]:
    """The versions a file was written with, so that a number can be reproduced on the same install."""
    return {"zeroptim": __version__, "torch": torch.__version__, "python": platform.python_version()}


def encode_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a file zeroptim writes: ``meta`` under ``zeroptim``, after its format and
    before the versions that wrote it."""
    return {METADATA_KEY: json.dumps({"format": FORMAT_VERSION, **meta, "versions": versions()})}


def _fail(kind: Kind, p: Path, what: str) -> ZeroptimError:
    return ZeroptimError(f"{kind.what} '{p}': metadata '{METADATA_KEY}' {what}")


def decode_metadata(raw: Mapping[str, str], p: Path, kind: Kind) -> dict[str, Any]:
    """The ``zeroptim`` metadata of file ``p`` (of ``kind``, for messages): a JSON object of format 1 ({} when
    the file has none)."""
    if METADATA_KEY not in raw:
        return {}
    try:
        meta = loads_json(raw[METADATA_KEY])
    except ValueError as exc:
        raise _fail(kind, p, f"is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _fail(kind, p, "must be a JSON object")
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION or isinstance(meta.get("format"), bool):
        raise _fail(kind, p, f"has format {meta.get('format')!r}; this zeroptim reads format {FORMAT_VERSION}")
    return meta


#: Checkpoint metadata keys whose values must have these types (absent or null is fine for each).
_TYPES: dict[str, tuple[type, ...]] = {"step": (int,), "loss": (str,), "optimizer": (dict,), "batch": (str,),
                                        "run_id": (str,), "train_mode": (bool,), "model": (dict,), "base": (str,)}


def parse_metadata(raw: Mapping[str, str], p: Path) -> dict[str, Any]:
    """The ``zeroptim`` metadata of checkpoint ``p``, checked: a JSON object of format 1 whose known keys
    have their types, whose model names one of a ``name``, a ``factory`` or an ``hf_config`` (with ``kwargs`` an
    object, and ``peft``, an adapter config, only beside ``hf_config``), and whose ``batch`` and ``base`` are
    files inside the checkpoint's folder (relative paths without '..'). Unknown keys pass."""
    meta = decode_metadata(raw, p, CHECKPOINT)
    for key, types in _TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise _fail(CHECKPOINT, p, f"key '{key}' must be {' or '.join(t.__name__ for t in types)}, "
                                       f"not {type(value).__name__}")
    model = meta.get("model")
    if model is not None:
        named = [k for k in ("name", "factory") if isinstance(model.get(k), str)]
        named += [SPEC_KEY] if isinstance(model.get(SPEC_KEY), dict) else []
        if len(named) != 1:
            raise _fail(CHECKPOINT, p, f"key 'model' must hold a string 'name', a string 'factory' or an object "
                                       f"'{SPEC_KEY}'")
        if not isinstance(model.get("kwargs") or {}, dict):
            raise _fail(CHECKPOINT, p, "key 'model.kwargs' must be an object")
        if PEFT_KEY in model and not (isinstance(model[PEFT_KEY], dict) and SPEC_KEY in model):
            raise _fail(CHECKPOINT, p, f"key 'model.{PEFT_KEY}' must be an object (an adapter config) beside "
                                       f"'{SPEC_KEY}'")
    batches = meta.get("batches")
    if batches is not None and (not isinstance(batches, list) or not batches):
        raise _fail(CHECKPOINT, p, "key 'batches' must be a non-empty list of file names")
    for batch in ([meta["batch"]] if meta.get("batch") is not None else []) + (batches or []):
        if not _local_name(batch):
            raise _fail(CHECKPOINT, p, f"key 'batch' or 'batches' must name files in the checkpoint's folder, "
                                       f"not {batch!r}")
    if meta.get("optimizer") is not None:
        try:
            gradient_scale(meta["optimizer"])
        except ValueError as exc:
            raise _fail(CHECKPOINT, p, str(exc)) from exc
    if meta.get("base") is not None and not _local_name(meta["base"]):
        raise _fail(CHECKPOINT, p, f"key 'base' must name a file in the checkpoint's folder, not {meta['base']!r}")
    return meta


#: The optimizer description's key for the factor c of a step taken along c·∇f instead of ∇f (f the mean over
#: the step's batches that zeroptim analyses): Trainer's step of a model whose loss ignores ``num_items_in_batch``
#: (T5, BART) sums its k micro-batches' mean losses, so c = k.
GRADIENT_SCALE = "gradient_scale"


def gradient_scale(description: Mapping[str, Any] | None) -> float:
    """The recorded optimizer's ``gradient_scale`` (1 when absent); ValueError unless a positive number."""
    value = (description or {}).get(GRADIENT_SCALE, 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"key 'optimizer.{GRADIENT_SCALE}' must be a positive number, not {json.dumps(value)[:40]}")
    return float(value)


def _local_name(name: object) -> bool:
    """Whether ``name`` names a file in a checkpoint's folder: a relative path without '..'."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def batch_entry(names: Sequence[str]) -> dict[str, Any]:
    """The checkpoint metadata naming the batches ``names`` of its step: ``batch`` for one, ``batches`` for
    several (none: nothing)."""
    if not names:
        return {}
    return {"batch": names[0]} if len(names) == 1 else {"batches": list(names)}


def recorded_batch_paths(meta: Mapping[str, Any], folder: Path, source: Path) -> list[Path]:
    """The batches metadata ``meta`` of checkpoint ``source`` records (``batches``, else ``batch``), in
    ``folder``; each must still be inside the folder once symlinks are followed (a link, or a linked
    subfolder, leading elsewhere is refused: the metadata names files beside the checkpoint, nothing else)."""
    names = meta.get("batches") or ([meta["batch"]] if meta.get("batch") else [])
    paths = []
    for name in names:
        out = leads_out(folder, name)
        if out is not None:
            raise ZeroptimError(f"checkpoint '{source}': its recorded batch '{name}' leads out of its folder "
                                f"(to '{out}'); pass the batch with --batch if you mean it")
        paths.append(folder / name)
    return paths


def state_metadata(step: int, description: dict[str, Any], param_groups: int,
                   groups: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``zeroptim`` metadata of an optimizer state before step ``step``, but its format and versions
    (``encode_metadata`` adds them): the optimizer's ``description``, its distinct parameter groups and, if
    given, every group as ``{"params": [parameter names], <hyper-parameters>}``."""
    meta = {"step": step, "optimizer": description, "param_groups": param_groups}
    return meta if groups is None else {**meta, "groups": groups}


@dataclass(frozen=True)
class StateMetadata:
    """An optimizer state's metadata: the step and optimizer description it records (None when absent, as
    in files written before they were recorded), its parameter groups (their number, and each group when
    recorded), and the whole object."""

    step: int | None = None
    optimizer: dict[str, Any] | None = None
    param_groups: int = 1
    meta: dict[str, Any] = field(default_factory=dict)
    groups: list[dict[str, Any]] | None = None


def parse_state_metadata(raw: Mapping[str, str], p: Path, step: int | None = None) -> StateMetadata:
    """The metadata of optimizer state ``p``, checked (``state_metadata``'s keys); with ``step``, the step of
    the checkpoint it was found beside, which a recorded step must equal."""
    meta = decode_metadata(raw, p, STATE)
    recorded, groups, optimizer = meta.get("step"), meta.get("param_groups", 1), meta.get("optimizer")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ZeroptimError(f"optimizer state '{p}': metadata key 'param_groups' must be a positive integer, "
                            f"not {json.dumps(groups)[:40]}")
    if optimizer is not None and not isinstance(optimizer, dict):
        raise ZeroptimError(f"optimizer state '{p}': metadata key 'optimizer' must be an object")
    listed = meta.get("groups")
    if listed is not None and not (isinstance(listed, list) and listed and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(n, str) for n in g["params"])
            for g in listed)):
        raise ZeroptimError(f"optimizer state '{p}': metadata key 'groups' must be a list of objects, each with "
                            "'params', a list of parameter names")
    recorded = recorded if isinstance(recorded, int) else None
    if step is not None and recorded is not None and recorded != step:
        raise ZeroptimError(f"optimizer state '{p}' records step {recorded}, its checkpoint {step}")
    return StateMetadata(recorded, optimizer, groups, meta, listed)


@dataclass(frozen=True)
class Found:
    """A checkpoint of a run folder: its step, the batches it records, or why it is unreadable."""

    path: Path
    step: int | None
    batches: tuple[Path, ...] = ()
    error: str | None = None


def scan(path: Path) -> Found | None:
    """What ``path`` is, from its header alone: a checkpoint (step from its metadata, else ``step_in_name``),
    or None for a file of another kind (a batch, an optimizer state, a recorded base). An unreadable file is a
    checkpoint whose pair will fail, never a silent skip. A Hugging Face or peft adapter folder's step is
    ``io.hf.folder_step``'s; it records no batch."""
    if path.is_dir():
        try:
            return Found(path, folder_step(path))
        except ZeroptimError as exc:
            return Found(path, step_in_name(path), error=str(exc))
    if kind_of(path.name) not in (None, CHECKPOINT):
        return None
    try:
        entries, raw = read_header(path, CHECKPOINT.what)
        meta = parse_metadata(raw, path)
        batches = tuple(recorded_batch_paths(meta, path.parent, path))
    except ZeroptimError as exc:
        return Found(path, step_in_name(path), error=str(exc))
    if set(entries) == {"inputs", "targets"} or meta.get("role") == BASE_ROLE:  # a batch by another name, a base
        return None
    step = meta.get("step")
    return Found(path, step if step is not None else step_in_name(path), batches)


@dataclass(frozen=True)
class RunFolder:
    """The checkpoints of a run folder by step, and those with no step (unreadable and unnumbered)."""

    steps: dict[int, Found]
    unnumbered: list[Path]


def is_checkpoint_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint folder or a peft adapter folder."""
    return is_hf_folder(path) or is_adapter_folder(path)


def scan_run(folder: Path) -> RunFolder:
    """Every checkpoint of ``folder`` (``*.safetensors`` files, Hugging Face ``checkpoint-N`` folders and peft
    adapter folders, ``scan``), by step; two of one step, or none at all, are an error naming the folder."""
    if not folder.is_dir():
        raise ZeroptimError(f"run folder '{folder}' is not a directory")
    steps: dict[int, Found] = {}
    unnumbered: list[Path] = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) + sorted(p for p in folder.iterdir() if is_checkpoint_folder(p)):
        found = scan(path)
        if found is None:
            continue
        if found.step is None:
            unnumbered.append(path)
            continue
        if found.step in steps:
            raise ZeroptimError(f"run folder '{folder}': '{steps[found.step].path.name}' and '{path.name}' "
                                f"are both step {found.step}")
        steps[found.step] = found
    if not steps:
        raise ZeroptimError(f"run folder '{folder}' holds no checkpoints (*.safetensors with a step, or "
                            "Hugging Face or peft adapter checkpoint-N folders)")
    return RunFolder(steps, unnumbered)
