"""From files to a PairAnalysis: load and check two checkpoints, rebuild the model, load the batches.

A pair is analysed in memory (``analysis.pair``), or streamed (``analysis.streamed``: the checkpoints'
headers read, the model a skeleton, each tensor read when its module runs) with ``--stream``, or with
``--max-memory SIZE`` when ``in_memory_bytes`` exceeds SIZE and the settings allow streaming.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zeroptim_cli.analysis.critical import DEFAULT_TOL
from zeroptim_cli.analysis.directions import NAMED, resolve_direction
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.analysis.pair import analyze_pair
from zeroptim_cli.analysis.result import PairAnalysis
from zeroptim_cli.analysis.sanity import pair_warnings
from zeroptim_cli.analysis.streamed import analyze_streamed
from zeroptim_cli.analysis.trainable import split_trainable
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.losses import Loss, default_loss, resolve_loss, resolve_metadata_loss
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import Batch, load_batch
from zeroptim_cli.io.checkpoint import Checkpoint, check_compatible, load_checkpoint, needs_base, state_for_model
from zeroptim_cli.io.files import read_header
from zeroptim_cli.io.layout import parse_metadata, recorded_batch_paths, state_name
from zeroptim_cli.io.lazy import TensorFiles, open_lazily
from zeroptim_cli.io.outputs import Inputs
from zeroptim_cli.io.specs import Trust, spec_file
from zeroptim_cli.models import build_model
from zeroptim_cli.models.skeleton import free_meta_initialisers, skeleton


@dataclass(frozen=True)
class Settings(Evaluation):
    """How to analyse, one field per flag of ``zeroptim analyze``: how f is evaluated (the fields of
    ``derivatives.Evaluation``: the differentiation ``method``, ``train`` mode and its ``seed``, ``dtype``,
    ``device``, the examples per evaluation ``chunk_size``; this object is passed whole down to the
    objective), the ``model`` and ``loss`` overrides (specs, None: the metadata's), the ``direction`` analysed
    (``update``: Δ itself, another name of ``analysis.directions.NAMED``, or a .safetensors file), whether code
    named in the checkpoints' metadata may run (``trust_code``, see ``io.specs.Trust``), whether to search the
    critical scale along Δ (``critical``, to the relative tolerance ``critical_tol``), and whether to stream the
    parameters module by module (``stream``, or by itself when the in-memory analysis is estimated to need more
    than ``max_memory`` bytes; ``analysis.streamed``), and the base model folder of peft adapter checkpoints
    (``base``, else the one each adapter's config names: ``io.peft``). Which of them a sweep's results depend
    on is ``analysis.sweep.KEYED``'s to say."""

    device: str | torch.device = "auto"  # the command line's default; a library call's is Evaluation's
    model: str | None = None
    loss: str | None = None
    direction: str = "update"
    trust_code: bool = False
    critical: bool = False
    critical_tol: float = DEFAULT_TOL
    stream: bool = False
    max_memory: int | None = None
    base: str | None = None

    @property
    def trust(self) -> Trust:
        return Trust(self.trust_code, frozenset(s for s in (self.model, self.loss) if s is not None))

    @property
    def base_folder(self) -> Path | None:
        return Path(self.base) if self.base is not None else None


def batches_for(ckpt_t: Checkpoint, batch_paths: Sequence[str | os.PathLike] = ()) -> list[Batch]:
    """The batches of ``batch_paths``, or else those recorded in checkpoint t's metadata."""
    return [load_batch(p) for p in batch_paths] if batch_paths else recorded_batches(ckpt_t)


def recorded_batches(ckpt: Checkpoint) -> list[Batch]:
    """The batches recorded in the checkpoint's metadata; an error when there is none."""
    if not ckpt.batch_paths:
        raise ConfigError(f"no batch: pass --batch FILE ('{ckpt.path}' records no batch in its metadata)")
    return [load_batch(p) for p in ckpt.batch_paths]


def model_and_loss(ckpt_t: Checkpoint, ckpt_t1: Checkpoint | None, settings: Settings,
                   batches: Sequence[Batch]) -> tuple[nn.Module, Loss]:
    """The model (from checkpoint t's metadata, else t1's, unless ``--model``) and the loss (``--loss``,
    else checkpoint t's metadata, else the default for ``batches``: the model's own loss for keyword-argument
    batches, cross-entropy otherwise), code in metadata run only as ``settings.trust`` allows.

    The model is built on the meta device first and its tensors' names and shapes are compared with the
    checkpoint's, so that metadata asking for a model far larger than the file fails before any memory is
    taken; then it is built as a skeleton (``models.skeleton``: parameters on the meta device, buffers real),
    its parameters being the checkpoints' (a factory is called twice: keep it free of side effects)."""
    source = ckpt_t if ckpt_t.model_spec or ckpt_t1 is None or not ckpt_t1.model_spec else ckpt_t1

    def build() -> nn.Module:
        try:
            return build_model(source.model_spec, settings.model, base_dir=source.path.parent, trust=settings.trust,
                               source=source.path)
        except ZeroptimError as exc:  # kwargs of the metadata that the model does not take: name the file
            if settings.model is not None or str(source.path) in str(exc):
                raise
            raise type(exc)(f"checkpoint '{source.path}': {exc}") from exc

    try:  # shapes first, on the meta device: metadata asking for a huge model fails before allocating it
        with torch.device("meta"), free_meta_initialisers():
            probe = build()
    except ZeroptimError:
        probe = None  # a factory that cannot build on the meta device: its real build says what is wrong
    if probe is not None:
        state_for_model(probe, source)
    with skeleton():
        model = build()
    if settings.loss is not None:
        return model, resolve_loss(settings.loss, model)
    spec = ckpt_t.meta.get("loss") or default_loss(batches)
    return model, resolve_metadata_loss(spec, ckpt_t.path, settings.trust, model)


@dataclass(frozen=True)
class PreparedPair:
    """What a pair's analysis starts from: the model and loss, the parameters at t (and t1, if given) and
    the buffers of t, all as the checkpoints hold them."""

    model: nn.Module
    loss: Loss
    params_t: dict[str, Tensor]
    buffers_t: dict[str, Tensor]
    params_t1: dict[str, Tensor] | None
    #: the result's keys saying which parameters are analysed (``analysis.trainable.subset_keys``)
    subset: dict[str, Any] = field(default_factory=dict)
    #: the names of the frozen parameters, held fixed among ``buffers_t``
    frozen: tuple[str, ...] = ()


def prepare_pair(ckpt_t: Checkpoint, ckpt_t1: Checkpoint | None, settings: Settings, batches: Sequence[Batch],
                 unchanged: Callable[[Tensor, Tensor], bool] | None = None) -> PreparedPair:
    """Check the two checkpoints against each other, build the model and the loss, and match the tensors;
    the model's frozen parameters are held fixed with the buffers (``analysis.trainable``, whose check that
    they did not change ``unchanged`` replaces for tensors that are not in memory)."""
    if ckpt_t1 is not None:
        check_compatible(ckpt_t, ckpt_t1)
    model, loss = model_and_loss(ckpt_t, ckpt_t1, settings, batches)
    params_t, buffers_t = state_for_model(model, ckpt_t)
    params_t1 = state_for_model(model, ckpt_t1)[0] if ckpt_t1 is not None else None
    source = f"checkpoints '{ckpt_t.path}' and '{ckpt_t1.path}'" if ckpt_t1 is not None else f"checkpoint '{ckpt_t.path}'"
    split = split_trainable(model, params_t, buffers_t, params_t1, source, unchanged)
    return PreparedPair(model, loss, split.params_t, split.fixed_t, split.params_t1, split.keys, split.frozen)


def analyze_checkpoints(ckpt_t: Checkpoint, ckpt_t1: Checkpoint, batches: Sequence[Batch],
                        settings: Settings = Settings(), loss_t1: float | None = None,
                        extras: Extras | None = None) -> PairAnalysis:
    """Analyse the step from ``ckpt_t`` to ``ckpt_t1`` on ``batches`` (see ``analyze_pair``)."""
    p = prepare_pair(ckpt_t, ckpt_t1, settings, batches)
    assert p.params_t1 is not None
    if extras is not None:
        extras.check(sum(t.numel() for t in p.params_t.values()))
    result = analyze_pair(
        p.model, p.params_t, p.params_t1, batches, p.loss, settings, buffers=p.buffers_t, loss_t1=loss_t1,
        direction=resolve_direction(settings.direction, ckpt_t), direction_name=settings.direction, extras=extras,
        critical_tol=settings.critical_tol if settings.critical else None,
    )
    return _recorded(result, ckpt_t, ckpt_t1, p, settings)


def _recorded(result: PairAnalysis, ckpt_t: Checkpoint, ckpt_t1: Checkpoint, p: PreparedPair,
              settings: Settings) -> PairAnalysis:
    """The result with what the checkpoints record: steps, learning rate, the pair's warnings first, and
    which parameters were analysed."""
    result.step_t, result.step_t1 = ckpt_t.step, ckpt_t1.step
    result.learning_rate = ckpt_t.learning_rate
    result.warnings = pair_warnings(ckpt_t, ckpt_t1, p.model, settings.train, result.update_norm) + result.warnings
    result.subset = dict(p.subset)
    return result


def streaming_refusal(settings: Settings, extras: Extras | None) -> str | None:
    """Why the settings cannot be streamed (streaming is Taylor mode along the update), or None."""
    if settings.method not in ("auto", "taylor"):
        return f"--method {settings.method} (streaming runs Taylor mode)"
    if settings.direction != "update":
        return "--direction (other directions need the gradient, which Taylor mode does not compute)"
    if extras is not None and extras.any:
        return "the extras (--concentration, --clip-whatif, --line-search, --lanczos, --hutchinson, --deep)"
    return None


#: Copies of the parameters, in the run's dtype, that the in-memory analysis holds beside both checkpoints as
#: stored: w_t, w_t1, Δ and the model's own, and for a Hessian-vector product also g and HΔ.
IN_MEMORY_COPIES = {"taylor": 4, "other": 6}


def in_memory_bytes(ckpt_t: Checkpoint, ckpt_t1: Checkpoint | None, settings: Settings) -> int:
    """The estimated peak of the in-memory analysis, activations left out:

        bytes of both checkpoints (or t alone) as stored + k · N · (bytes of one value in the run's dtype),

    N the floating-point values of checkpoint t, k = ``IN_MEMORY_COPIES`` (4 for Taylor mode, else 6)."""
    stored = sum(t.numel() * t.element_size() for c in (ckpt_t, ckpt_t1) if c is not None for t in c.tensors.values())
    values = sum(t.numel() for t in ckpt_t.tensors.values() if t.is_floating_point())
    copies = IN_MEMORY_COPIES["taylor" if settings.method == "taylor" else "other"]
    return stored + copies * values * settings.torch_dtype.itemsize


def open_streamed(path_t: str | os.PathLike, path_t1: str | os.PathLike, settings: Settings,
                  extras: Extras | None = None) -> tuple[tuple[Checkpoint, TensorFiles], tuple[Checkpoint, TensorFiles]] | None:
    """Both checkpoints opened lazily when the pair is to be streamed (``--stream``, or ``--max-memory`` below
    ``in_memory_bytes`` and settings that allow it), else None. ``--stream`` with settings that cannot be
    streamed is a usage error."""
    if not settings.stream and settings.max_memory is None:
        return None
    refusal = streaming_refusal(settings, extras) or next(
        (f"'{p}', a peft adapter checkpoint (read in memory, on its base)" for p in map(Path, (path_t, path_t1))
         if needs_base(p)), None)
    if settings.stream and refusal is not None:
        raise ConfigError(f"--stream cannot be combined with {refusal}")
    lazy_t, lazy_t1 = open_lazily(path_t), open_lazily(path_t1)
    if settings.stream:
        return lazy_t, lazy_t1
    fits = settings.max_memory is not None and in_memory_bytes(lazy_t[0], lazy_t1[0], settings) <= settings.max_memory
    return None if fits or refusal is not None else (lazy_t, lazy_t1)


def analyze_lazily(lazy_t: tuple[Checkpoint, TensorFiles], lazy_t1: tuple[Checkpoint, TensorFiles],
                   batches: Sequence[Batch], settings: Settings = Settings(),
                   loss_t1: float | None = None) -> PairAnalysis:
    """Analyse the step between two lazily opened checkpoints, streamed (``analysis.streamed``)."""
    (ckpt_t, files_t), (ckpt_t1, files_t1) = lazy_t, lazy_t1
    device, dtype = settings.torch_device, settings.torch_dtype
    with skeleton():
        p = prepare_pair(ckpt_t, ckpt_t1, settings, batches, unchanged=lambda a, b: bool(
            torch.equal(files_t.read(files_t.key(a)), files_t1.read(files_t1.key(b)))))
    assert p.params_t1 is not None

    def reader(files: TensorFiles, stored: Tensor) -> functools.partial[Tensor]:
        return functools.partial(files.read, files.key(stored), device, dtype)

    sources = {n: (reader(files_t, t), reader(files_t1, p.params_t1[n])) for n, t in p.params_t.items()}
    # a frozen parameter is streamed as the others are, read from checkpoint t alone (Δ = 0: a constant)
    sources.update({n: (reader(files_t, p.buffers_t[n]), reader(files_t, p.buffers_t[n])) for n in p.frozen})
    buffers = {n: files_t.read(files_t.key(t)) for n, t in p.buffers_t.items() if n not in p.frozen}
    result = analyze_streamed(p.model, sources, buffers, batches, p.loss, settings, loss_t1=loss_t1,
                              critical_tol=settings.critical_tol if settings.critical else None,
                              analysed=set(p.params_t))
    return _recorded(result, ckpt_t, ckpt_t1, p, settings)


def analyze_files(path_t: str | os.PathLike, path_t1: str | os.PathLike,
                  batch_paths: Sequence[str | os.PathLike] = (), settings: Settings = Settings(),
                  extras: Extras | None = None) -> PairAnalysis:
    """Analyse a pair of checkpoint files, on ``batch_paths`` or else the batch recorded in ``path_t``,
    in memory or streamed (see the module docstring)."""
    lazy = open_streamed(path_t, path_t1, settings, extras)
    if lazy is not None:
        return analyze_lazily(*lazy, batches_for(lazy[0][0], batch_paths), settings)
    ckpt_t, ckpt_t1 = load_checkpoint(path_t, settings.base_folder), load_checkpoint(path_t1, settings.base_folder)
    return analyze_checkpoints(ckpt_t, ckpt_t1, batches_for(ckpt_t, batch_paths), settings, extras=extras)


def checkpoint_files(path: Path) -> list[Path]:
    """The files reading checkpoint ``path`` may open, from its header alone: the file itself (a folder:
    every file in it), the batches its metadata records, the optimizer state saved beside it, and the
    files of the model factory and loss it names. An unreadable header gives the file alone (reading it
    fails later, naming it)."""
    if path.is_dir():
        return [path]
    try:
        meta = parse_metadata(read_header(path, "checkpoint")[1], path)
        files = [path, *recorded_batch_paths(meta, path.parent, path)]
    except ZeroptimError:
        return [path]
    if isinstance(meta.get("base"), str):
        files.append(path.parent / meta["base"])
    if isinstance(meta.get("step"), int) and meta["step"] >= 0:
        files.append(path.parent / state_name(meta["step"]))
    specs = [(meta.get("model") or {}).get("factory"), meta.get("loss")]
    return files + [f for s in specs if isinstance(s, str) for f in [spec_file(s, path.parent)] if f is not None]


def command_inputs(checkpoints: Sequence[Path], batch_paths: Sequence[Path] = (), settings: Settings = Settings(),
                   others: Sequence[Path] = ()) -> Inputs:
    """Every file a command analysing ``checkpoints`` reads (``io.outputs.Inputs``, which outputs are
    checked against): the checkpoints with ``checkpoint_files``, the ``--batch`` files, the files of
    ``--model``, ``--loss`` and ``--direction``, and ``others`` (``--state`` files or folders)."""
    inputs = Inputs([*batch_paths, *others, *([settings.base_folder] if settings.base_folder else [])])
    for spec in (s for s in (settings.model, settings.loss) if s):  # looked up in the working directory, then
        for base in [None, *(Path(p).parent for p in checkpoints)]:  # beside the checkpoint (``load_callable``)
            found = spec_file(spec, base)
            if found is not None:
                inputs.add(found)
    if settings.direction not in NAMED:
        inputs.add(Path(settings.direction))
    for path in dict.fromkeys(map(Path, checkpoints)):  # a sweep names each checkpoint in two pairs
        for f in checkpoint_files(path):
            inputs.add(f)
    return inputs
