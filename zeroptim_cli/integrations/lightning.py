"""Recording from PyTorch Lightning's ``Trainer``: a callback that saves optimizer steps through the ``Recorder``.

    from zeroptim_cli.integrations.lightning import ZeroptimCallback
    trainer = L.Trainer(callbacks=[ZeroptimCallback(every=100, module="model", loss="cross_entropy",
                                                    model_spec={"factory": "mymodels.py:build"})])

A LightningModule's ``training_step`` is arbitrary code, so the callback is told what it computes: the loss
of step s is assumed to be ``loss(module(inputs), targets)`` on every micro-batch, with ``module`` the
nn.Module the LightningModule holds at that attribute (``""``: the LightningModule itself), ``loss`` a
zeroptim loss spec (a built-in name or ``MODULE:FN``, as for the ``Recorder``) and ``(inputs, targets) =
split_batch(batch)`` (default: a pair ``(x, y)``, or a dict whose ``labels`` are the targets). Checkpoints
hold ``module``'s parameters under its own names, so ``model_spec`` rebuilds it alone. The assumption is
checked (``check_loss``): on every micro-batch of a recorded step the callback evaluates that loss itself
(without gradient, on copies of the buffers, with the random state ``training_step`` then starts from, so
that dropout draws the same masks, in the precision plugin's forward context, autocast included) and raises if it differs from what ``training_step`` returned by more
than 1e-4 relatively. Every optimizer parameter must be one of ``module``'s.

For each recorded step s (steps 0, K, 2K, … of ``every=K``, plus any of ``steps``), in ``folder``
(default ``{trainer.log_dir}/zeroptim``), exactly the Recorder's files: the weights just before the optimizer
step (torch's step pre-hook) and just after it (its post-hook), so that Δ is the optimizer's own update bit
for bit; every micro-batch the step's gradient was accumulated over; the optimizer's state before the step,
with Lightning's ``gradient_clip_val`` as ``max_grad_norm`` (norm clipping; clipping by value cannot be
taken again and is refused unless ``save_optimizer_state=False``). ``zeroptim sweep FOLDER`` then analyses
every recorded step.

The objective. With ``accumulate_grad_batches=k`` Lightning divides each micro-batch's loss ℓ_i by k, so its
step is along (1/k)·Σ_i ∇ℓ_i, while zeroptim's f over the m recorded micro-batches is Σ n_i ℓ_i / Σ n_i (n_i
their counts: examples, or counted tokens). The two agree when the m = k micro-batches count alike; a step
that accumulated fewer (an epoch's last, m < k) is that of (m/k)·f, and micro-batches that count differently
make Lightning's objective another one than f: both are warned of. A single process only (several ranks
step along every rank's batches), and automatic optimization with one optimizer.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from zeroptim_cli.derivatives.losses import Loss, resolve_loss
from zeroptim_cli.io.batches import LABELS, Batch
from zeroptim_cli.io.layout import TRAINER_RUN_FOLDER
from zeroptim_cli.training.recorder import BatchPair, Recorder

#: How far the loss zeroptim computes may lie from ``training_step``'s, relatively (float32 rounding).
LOSS_RTOL = 1e-4


def split_pair_or_labels(batch: Any) -> BatchPair:
    """The default ``split_batch``: ``(inputs, targets)`` of a pair, or a dict's ``labels`` and the rest."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and LABELS in batch:
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    raise ValueError(f"ZeroptimCallback: a batch of type {type(batch).__name__} is neither an (inputs, targets) "
                     "pair nor a dict with 'labels'; pass split_batch=fn returning (inputs, targets)")


def _copy(t: Tensor) -> Tensor:
    return t.detach().cpu().clone()


def _detached(batch: BatchPair) -> BatchPair:
    """A copy of a batch on the CPU, kept until the step is saved."""
    inputs, targets = batch
    return (_copy(inputs) if isinstance(inputs, Tensor) else {k: _copy(v) for k, v in inputs.items()}), _copy(targets)


class ZeroptimCallback(Callback):
    """Records (weights before, micro-batches, weights after, optimizer state) around chosen optimizer steps
    of a Lightning fit through a ``Recorder`` (module docstring)."""

    def __init__(self, folder: str | os.PathLike | None = None, *, every: int | None = None, steps: Iterable[int] = (),
                 module: str = "", loss: str = "cross_entropy", model_spec: dict[str, Any] | None = None,
                 split_batch: Callable[[Any], BatchPair] = split_pair_or_labels, save_optimizer_state: bool = True,
                 check_loss: bool = True, overwrite: bool = False) -> None:
        if every is not None and every <= 0:
            raise ValueError("every must be a positive number of steps")
        self.folder = Path(folder) if folder is not None else None
        self.every, self.steps = every, set(steps)
        self.module_name, self.loss_spec, self.model_spec = module, loss, model_spec
        self.split_batch, self.save_optimizer_state = split_batch, save_optimizer_state
        self.check_loss, self.overwrite = check_loss, overwrite
        self.recorder: Recorder | None = None
        self._module: nn.Module | None = None
        self._loss: Loss | None = None
        self._hooks: list[Any] = []
        self._micro: list[BatchPair] = []
        self._micro_step: int | None = None  # the optimizer step the micro-batches are for
        self._expected: float | None = None  # our loss on the micro-batch training_step is computing
        self._step: int | None = None  # the step being taken, while it is recorded
        self._accumulation = 1

    @property
    def recorded(self) -> list[int]:
        """The steps recorded so far."""
        return self.recorder.recorded if self.recorder is not None else []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(f"ZeroptimCallback records a single process; this fit runs {trainer.world_size}, whose "
                             "step follows every rank's batches")
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise ValueError("ZeroptimCallback records automatic optimization with one optimizer")
        module = pl_module.get_submodule(self.module_name)
        optimizer = trainer.optimizers[0]
        own = {id(p) for p in module.parameters()}
        if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(f"ZeroptimCallback: the optimizer steps parameters outside module "
                             f"'{self.module_name}', which the checkpoints would not hold")
        clip = trainer.gradient_clip_val
        if clip and (trainer.gradient_clip_algorithm or "norm") != "norm" and self.save_optimizer_state:
            raise ValueError("ZeroptimCallback: clipping by value cannot be taken again from the optimizer state; "
                             "pass save_optimizer_state=False")
        folder = self.folder or Path(trainer.log_dir or trainer.default_root_dir) / TRAINER_RUN_FOLDER
        self._module, self._loss = module, resolve_loss(self.loss_spec, module)
        self._accumulation = trainer.accumulate_grad_batches
        self.recorder = Recorder(folder, module, optimizer, every=self.every, steps=self.steps,
                                 model_spec=self.model_spec, loss=self.loss_spec,
                                 save_optimizer_state=self.save_optimizer_state, overwrite=self.overwrite,
                                 max_grad_norm=float(clip) if clip else None)
        self._hooks = [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]
        self._micro, self._micro_step, self._expected, self._step = [], None, None, None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.recorder is not None:
            self.recorder.close()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.recorder is None or not self.recorder.wants(trainer.global_step):
            return
        micro = self.split_batch(batch)
        self._micro.append(_detached(micro))
        self._micro_step = trainer.global_step
        if self.check_loss:
            with trainer.precision_plugin.forward_context():  # autocast, as training_step runs under it
                self._expected = self._loss_of(micro)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ours, self._expected = self._expected, None
        if ours is None or outputs is None:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        theirs = float(loss) * self._accumulation  # Lightning hands on the loss divided by k
        if not math.isclose(ours, theirs, rel_tol=LOSS_RTOL, abs_tol=1e-7):
            raise ValueError(f"ZeroptimCallback: loss '{self.loss_spec}' of module '{self.module_name}' gives {ours:.6g} "
                             f"on micro-batch {batch_idx}, training_step returned {theirs:.6g}: the recorded steps "
                             "would be analysed with "
                             "another loss than the one Lightning minimised (pass module=, loss= and split_batch= "
                             "that match training_step, or check_loss=False)")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._micro, self._micro_step, self._expected = [], None, None

    def _loss_of(self, micro: BatchPair) -> float:
        """The loss zeroptim will analyse, on the current weights, without gradient, on copies of the buffers
        (no running statistic moves) and from the random state ``training_step`` will start from."""
        assert self._module is not None and self._loss is not None
        batch = Batch(*micro, source="Lightning batch")
        self._loss.validate(batch)
        args, kwargs = batch.model_args()
        buffers = {k: b.clone() for k, b in self._module.named_buffers()}
        cuda = sorted({p.device.index or 0 for p in self._module.parameters() if p.device.type == "cuda"})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            outputs = torch.func.functional_call(self._module, buffers, args, kwargs, strict=False)
            return float(self._loss(outputs, batch.targets))

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """torch's step pre-hook: the weights are w_t, the state is the one the step starts from."""
        if not self._micro or self.recorder is None or self._micro_step is None:
            return
        self._step = self._micro_step
        self._warn_of_weights(self._step)
        self.recorder.before(self._step, self._micro)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """torch's step post-hook: the weights are w_t1."""
        if self._step is not None and self.recorder is not None:
            self.recorder.after(self._step)
        self._micro, self._micro_step, self._step = [], None, None

    def _warn_of_weights(self, step: int) -> None:
        """Warn when Lightning's objective for this step is not f (module docstring)."""
        assert self._loss is not None
        m, k = len(self._micro), self._accumulation
        if m < k:
            warnings.warn(f"ZeroptimCallback: step {step} accumulated {m} of {k} micro-batches; Lightning divides "
                          f"by {k}, so its step is that of {m}/{k} times the f it is analysed with", stacklevel=2)
        counts = [self._loss.count(targets) for _, targets in self._micro]
        if len(set(counts)) > 1:
            warnings.warn(f"ZeroptimCallback: the micro-batches of step {step} count {counts}; Lightning minimises "
                          "the plain mean of their losses, f weights each by its count, so the recorded step is not "
                          "along f's gradient (give micro-batches alike, e.g. drop_last=True)", stacklevel=2)
