"""Recording consecutive checkpoints from any training loop.

Three added lines record a step: checkpoint t just before ``optimizer.step()``, checkpoint t+1 just after,
and the batch the step used::

    rec = Recorder("runs/sgd", model, optimizer, every=100, model_spec={"name": "mlp"})
    ...
    with rec.step(step, inputs, targets):
        optimizer.step()

A step whose gradient was accumulated over several micro-batches records them all:
``rec.step(step, batches=[(inputs_1, targets_1), ...])``; a loop that splits the hooks (Lightning's callback)
calls ``rec.before(step, batches)`` and ``rec.after(step)`` itself.

Files, all written atomically: ``ckpt_{step:06d}.safetensors`` (metadata per docs/contract.md,
``batch`` naming the batch of the step that starts there, ``run_id`` telling this run from others and
``train_mode`` the model's mode during the step), ``batch_{step:06d}.safetensors`` (or, for several
micro-batches, ``batch_{step:06d}_{i}.safetensors``, named under ``batches``),
``optim_{step:06d}.safetensors`` (the optimizer state before the step, format in ``optim.state``; by
default, so that ``zeroptim compare`` can take the recorded optimizer's step again; nearly empty for plain
SGD), and ``run.json`` (names and metadata: ``io.layout``).

A folder that already holds a run's files is refused (two runs in one folder would mix), unless
``overwrite=True``, which first removes those files (and only those). The folder is locked while the
Recorder is open, and temporary files left by a killed run are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.checkpoint import save_checkpoint
from zeroptim_cli.io.files import exclusive_lock, remove_stale_temporaries, write_text_atomic
from zeroptim_cli.io.layout import (
    FORMAT_VERSION,
    RUN_FILE,
    batch_entry,
    batch_name,
    ckpt_name,
    run_files,
    state_name,
    versions,
)
from zeroptim_cli.optim.optimizers import optimizer_description
from zeroptim_cli.optim.state import save_state

#: One batch as the Recorder saves it: the model's inputs (a tensor, or keyword arguments) and the targets.
BatchPair = tuple[torch.Tensor | Mapping[str, torch.Tensor], torch.Tensor]


class Recorder:
    """Saves (checkpoint t, batch, checkpoint t+1) around chosen optimizer steps of a training loop.

    An optimizer whose ``step`` needs a closure (MeZO) is stepped inside the ``with`` as usual:
    ``optimizer.step(closure)``.

    Args:
        folder: the run folder (created if missing; locked while the Recorder is open).
        model, optimizer: what the loop trains and steps.
        every: record steps 0, every, 2·every, … (None: only ``steps``).
        steps: further steps to record.
        model_spec: how ``zeroptim analyze`` rebuilds the model with no flags, e.g.
            ``{"name": "mlp", "kwargs": {...}}`` or ``{"factory": "pkg.mod:fn"}``.
        loss: the loss the metadata names (``cross_entropy``, ``mse``, … or ``MODULE:FN``).
        save_optimizer_state: write ``optim_*.safetensors`` (the state before each recorded step; on by
            default, False skips them).
        max_grad_norm: the global norm c the loop clips g to before the step
            (``torch.nn.utils.clip_grad_norm_(params, c)``), so that the step is taken again with the same clipping.
        extra: more keys for ``run.json``.
        overwrite: remove the files of a run already in the folder instead of refusing it.

    Raises:
        ZeroptimError: the folder already holds a run (and ``overwrite`` is False), or another process records
            into it.

    Example (one recorded step: checkpoints t and t+1, the batch, the optimizer state, run.json):

    >>> import os, tempfile
    >>> import torch
    >>> from torch import nn
    >>> from zeroptim_cli import Recorder, load_checkpoint
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Linear(2, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
    >>> with tempfile.TemporaryDirectory() as run:
    ...     rec = Recorder(run, model, optimizer, steps=[0])
    ...     for step in range(2):
    ...         optimizer.zero_grad()
    ...         nn.functional.mse_loss(model(x), y).backward()
    ...         with rec.step(step, x, y):
    ...             optimizer.step()
    ...     rec.close()
    ...     files = sorted(os.listdir(run))
    ...     ckpt = load_checkpoint(os.path.join(run, "ckpt_000000.safetensors"))
    >>> for name in files:
    ...     print(name)
    batch_000000.safetensors
    ckpt_000000.safetensors
    ckpt_000001.safetensors
    optim_000000.safetensors
    run.json
    >>> rec.recorded, ckpt.step, ckpt.meta["batch"], ckpt.meta["optimizer"]["lr"]
    ([0], 0, 'batch_000000.safetensors', 0.1)
    """

    def __init__(self, folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 every: int | None = None, steps: Iterable[int] = (), model_spec: dict[str, Any] | None = None,
                 loss: str = "cross_entropy", save_optimizer_state: bool = True,
                 extra: dict[str, Any] | None = None, overwrite: bool = False,
                 max_grad_norm: float | None = None) -> None:
        if every is not None and every <= 0:
            raise ValueError("every must be a positive number of steps")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(exclusive_lock(self.folder / ".zeroptim.lock", f"run folder '{self.folder}'"))
        remove_stale_temporaries(self.folder)
        previous = run_files(self.folder)
        if previous and not overwrite:
            self._lock.close()
            raise ZeroptimError(f"run folder '{self.folder}' already holds a run ('{previous[0].name}', "
                                f"{len(previous)} files); record into a new folder, or replace it with overwrite=True "
                                "(Recorder(..., overwrite=True), the Lightning ZeroptimCallback(..., overwrite=True))")
        for path in previous:
            path.unlink()
        self.run_id = uuid.uuid4().hex
        self.model, self.optimizer = model, optimizer
        self.every, self.steps = every, set(steps)
        self.model_spec, self.loss = model_spec, loss
        self.save_optimizer_state = save_optimizer_state
        self.max_grad_norm = max_grad_norm
        self.extra = dict(extra or {})
        self.recorded: list[int] = []
        self._write_run()

    def close(self) -> None:
        """Release the folder's lock (also at exit: a Recorder in a script needs no close)."""
        self._lock.close()

    def wants(self, step: int) -> bool:
        """Whether ``step`` is one to record."""
        return step in self.steps or (self.every is not None and step % self.every == 0)

    def _description(self) -> dict[str, Any]:
        description = optimizer_description(self.optimizer)
        return description if self.max_grad_norm is None else {**description, "max_grad_norm": self.max_grad_norm}

    def _meta(self, step: int, batches: list[str]) -> dict[str, Any]:
        meta: dict[str, Any] = {"step": step, "loss": self.loss, "optimizer": self._description(),
                                "run_id": self.run_id, "train_mode": self.model.training}
        if self.model_spec is not None:
            meta["model"] = self.model_spec
        return {**meta, **batch_entry(batches)}

    @contextlib.contextmanager
    def step(self, step: int, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
             batches: Sequence[BatchPair] = ()) -> Iterator[None]:
        """Wrap ``optimizer.step()``: record around it when ``step`` is wanted, else do nothing. The step's
        batch is ``(inputs, targets)``, or its micro-batches ``batches``."""
        if (inputs is None) == (not batches) or (inputs is None) != (targets is None):
            raise ValueError("Recorder.step takes inputs and targets, or batches")
        if not self.wants(step):
            yield
            return
        self.before(step, batches or [(inputs, targets)])  # type: ignore[list-item]
        yield
        self.after(step)

    def before(self, step: int, batches: Sequence[BatchPair]) -> None:
        """Just before optimizer step ``step``: its batches, checkpoint ``step`` and the optimizer's state."""
        names = [batch_name(step)] if len(batches) == 1 else [batch_name(step, i) for i in range(len(batches))]
        for name, (inputs, targets) in zip(names, batches):
            save_batch(self.folder / name, inputs, targets)
        save_checkpoint(self.folder / ckpt_name(step), self.model, self._meta(step, names))
        if self.save_optimizer_state:
            save_state(self.folder / state_name(step), self.model, self.optimizer, step, self._description())

    def after(self, step: int) -> None:
        """Just after optimizer step ``step``: checkpoint ``step + 1``."""
        # If step t+1 is recorded too, its own "before" checkpoint rewrites this file with its batch.
        save_checkpoint(self.folder / ckpt_name(step + 1), self.model, self._meta(step + 1, []))
        self.recorded.append(step)
        self._write_run()

    def _write_run(self) -> None:
        run = {"format": FORMAT_VERSION, "run_id": self.run_id, "model": self.model_spec, "loss": self.loss,
               "optimizer": self._description(), "recorded_steps": self.recorded,
               "versions": versions(), **self.extra}
        write_text_atomic(self.folder / RUN_FILE, json.dumps(run, indent=2) + "\n")
