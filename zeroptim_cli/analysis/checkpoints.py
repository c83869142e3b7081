"""From files to a PairAnalysis: load and check two checkpoints, rebuild the model, load the batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from zeroptim_cli.analysis.critical import DEFAULT_TOL
from zeroptim_cli.analysis.directions import resolve_direction
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.analysis.pair import analyze_pair
from zeroptim_cli.analysis.result import PairAnalysis
from zeroptim_cli.analysis.sanity import pair_warnings
from zeroptim_cli.derivatives.losses import Loss, default_loss, resolve_loss, resolve_metadata_loss
from zeroptim_cli.errors import ConfigError
from zeroptim_cli.io.batches import Batch, load_batch
from zeroptim_cli.io.checkpoint import Checkpoint, check_compatible, load_checkpoint, state_for_model
from zeroptim_cli.io.specs import Trust
from zeroptim_cli.models import build_model
from zeroptim_cli.runtime import resolve_device, resolve_dtype


@dataclass(frozen=True)
class Settings:
    """How to analyse: model and loss overrides, device, dtype, HVP method, train mode and its seed, the
    examples per evaluation (``chunk_size``: ``auto``, N, or 0 for whole batches), whether code named
    in the checkpoints' metadata may run (``trust_code``, see ``io.specs.Trust``), whether to search the
    critical scale along Δ (``critical``, to the relative tolerance ``critical_tol``), and whether to stream
    the parameters module by module (``stream``, or by itself when the in-memory analysis is estimated to
    need more than ``max_memory`` bytes; ``analysis.streamed``)."""

    model: str | None = None
    loss: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    method: str = "auto"
    train: bool = False
    seed: int = 0
    direction: str = "update"
    trust_code: bool = False
    chunk_size: int | str = "auto"
    critical: bool = False
    critical_tol: float = DEFAULT_TOL
    stream: bool = False
    max_memory: int | None = None

    @property
    def trust(self) -> Trust:
        return Trust(self.trust_code, frozenset(s for s in (self.model, self.loss) if s is not None))


def recorded_lr(ckpt: Checkpoint) -> float | None:
    """The learning rate recorded in the checkpoint's optimizer metadata (``optimizer.lr``), else None."""
    lr = (ckpt.meta.get("optimizer") or {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


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
    batches, cross-entropy otherwise), code in metadata run only as ``settings.trust`` allows."""
    source = ckpt_t if ckpt_t.model_spec or ckpt_t1 is None or not ckpt_t1.model_spec else ckpt_t1
    model = build_model(source.model_spec, settings.model, base_dir=source.path.parent, trust=settings.trust,
                        source=source.path)
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


def prepare_pair(ckpt_t: Checkpoint, ckpt_t1: Checkpoint | None, settings: Settings,
                 batches: Sequence[Batch]) -> PreparedPair:
    """Check the two checkpoints against each other, build the model and the loss, and match the tensors."""
    if ckpt_t1 is not None:
        check_compatible(ckpt_t, ckpt_t1)
    model, loss = model_and_loss(ckpt_t, ckpt_t1, settings, batches)
    params_t, buffers_t = state_for_model(model, ckpt_t)
    params_t1 = state_for_model(model, ckpt_t1)[0] if ckpt_t1 is not None else None
    return PreparedPair(model, loss, params_t, buffers_t, params_t1)


def analyze_checkpoints(ckpt_t: Checkpoint, ckpt_t1: Checkpoint, batches: Sequence[Batch],
                        settings: Settings = Settings(), loss_t1: float | None = None,
                        extras: Extras | None = None) -> PairAnalysis:
    """Analyse the step from ``ckpt_t`` to ``ckpt_t1`` on ``batches`` (see ``analyze_pair``)."""
    dtype = resolve_dtype(settings.dtype)
    p = prepare_pair(ckpt_t, ckpt_t1, settings, batches)
    assert p.params_t1 is not None
    result = analyze_pair(
        p.model, p.params_t, p.params_t1, batches, p.loss,
        buffers=p.buffers_t, method=settings.method, train=settings.train, seed=settings.seed,
        device=resolve_device(settings.device), dtype=dtype, loss_t1=loss_t1,
        direction=resolve_direction(settings.direction, ckpt_t), direction_name=settings.direction, extras=extras,
        chunk_size=settings.chunk_size, critical_tol=settings.critical_tol if settings.critical else None,
    )
    result.step_t, result.step_t1 = ckpt_t.step, ckpt_t1.step
    result.learning_rate = recorded_lr(ckpt_t)
    result.warnings = pair_warnings(ckpt_t, ckpt_t1, p.model, settings.train) + result.warnings
    return result


def analyze_files(path_t: str | os.PathLike, path_t1: str | os.PathLike,
                  batch_paths: Sequence[str | os.PathLike] = (), settings: Settings = Settings(),
                  extras: Extras | None = None) -> PairAnalysis:
    """Analyse a pair of checkpoint files, on ``batch_paths`` or else the batch recorded in ``path_t``."""
    ckpt_t, ckpt_t1 = load_checkpoint(path_t), load_checkpoint(path_t1)
    return analyze_checkpoints(ckpt_t, ckpt_t1, batches_for(ckpt_t, batch_paths), settings, extras=extras)
