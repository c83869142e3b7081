"""Recording from transformers' ``Trainer``: a callback that saves optimizer steps in zeroptim's format.

    from zeroptim_cli.integrations.hf import ZeroptimCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[ZeroptimCallback(every=100)])

For each recorded step s (steps 0, K, 2K, … of ``every=K``, plus any of ``steps``), in ``folder``
(default ``{output_dir}/zeroptim``): ``ckpt_{s:06d}.safetensors``, the weights just before the optimizer
step (``on_pre_optimizer_step``); ``ckpt_{s+1:06d}.safetensors``, the weights just after it
(``on_optimizer_step``); and ``batch_{s:06d}_{i}.safetensors``, every micro-batch i the step's gradient was
accumulated over, as the model received them (keyword arguments with ``labels``). Checkpoint s's
metadata names them (``batch`` for one, ``batches`` for several), its model as ``{"hf_config": config}``
(rebuilt by transformers' own classes, no code of the run's) and its loss as ``model``, the model's own.
Beside it, ``optim_{s:06d}.safetensors``: the optimizer's state before the step (``optim.state``'s format,
its description with Trainer's ``max_grad_norm``, the learning rate the schedule gives the step), so that
``zeroptim compare`` and ``--direction adam`` take the step again. So ``zeroptim sweep FOLDER`` analyses
every recorded step with no flag.

A peft model (LoRA) is recorded as its base's ``hf_config`` with the adapter's config under ``peft``; its
frozen base weights are saved once, in ``base.safetensors`` (``io.layout.BASE_FILE``), which each checkpoint names
(metadata ``base``) and leaves out: a checkpoint holds the adapter's weights (and the buffers). The
analysis is then over the adapter's parameters, the base held fixed (``analysis.trainable``).

The step's batch is all its micro-batches, and f their exact token-weighted mean: what Trainer itself
minimises, since it divides the summed token losses of all micro-batches by ``num_items_in_batch``, the
counted labels of all of them (after the causal shift). The micro-batches are caught by a forward
pre-hook on the model that lives only while a recorded step accumulates (training-mode calls only, so
evaluation is never recorded): it is removed when the step is saved, when training ends, when the model's
forward raises, and, should training stop between a forward and the optimizer step, by the first call
beyond the step's gradient-accumulation count. An encoder-decoder (T5, BART) is recorded the same way, its
batches as Trainer passes them (the decoder inputs are made from the labels when analysed); with gradient
accumulation Trainer steps it along the sum of the k micro-batch means instead, k·∇f when they count the same
targets: a warning says so at training time, and the step records ``gradient_scale`` k in its optimizer
description (checkpoint and state file), so that the analyses warn of it and the recorded optimizer's step
is taken again with k·g (``optim.state.replay_step``). Training with label smoothing or a ``compute_loss_func`` minimises another loss than
the model's own, and is refused rather than recorded under a wrong name.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from zeroptim_cli.derivatives.losses import MODEL_LOSS
from zeroptim_cli.io.batches import LABELS, save_batch
from zeroptim_cli.io.checkpoint import save_base, save_checkpoint
from zeroptim_cli.io.hf import SPEC_KEY, comparable_config
from zeroptim_cli.io.layout import (
    BASE_FILE,
    GRADIENT_SCALE,
    TRAINER_RUN_FOLDER,
    batch_entry,
    batch_name,
    ckpt_name,
    state_name,
)
from zeroptim_cli.io.peft import PEFT_KEY, adapter_spec
from zeroptim_cli.models.hf import is_seq2seq_lm
from zeroptim_cli.optim.optimizers import optimizer_description
from zeroptim_cli.optim.state import save_state


class ZeroptimCallback(TrainerCallback):
    """Records (weights before, micro-batches, weights after) around chosen optimizer steps of a Trainer
    (module docstring). ``every`` records steps 0, every, 2·every, …; ``steps`` adds chosen ones."""

    def __init__(self, folder: str | os.PathLike | None = None, *, every: int | None = None,
                 steps: Iterable[int] = ()) -> None:
        if every is not None and every <= 0:
            raise ValueError("every must be a positive number of steps")
        self.folder = Path(folder) if folder is not None else None
        self.every, self.steps = every, set(steps)
        self.recorded: list[int] = []
        self._micro: list[dict[str, torch.Tensor]] | None = None
        self._hooks: list[Any] = []
        self._accumulation = 1
        self._base_saved = False

    def wants(self, step: int) -> bool:
        """Whether optimizer step ``step`` (from weights after ``step`` steps) is one to record."""
        return step in self.steps or (self.every is not None and step % self.every == 0)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        if args.label_smoothing_factor:
            raise ValueError("ZeroptimCallback: with label smoothing Trainer minimises another loss than the model's "
                             "own, which the recorded steps would be analysed with")
        if model is None:
            raise ValueError("ZeroptimCallback: Trainer passed no model to the callback")
        if self.folder is None:
            self.folder = Path(args.output_dir) / TRAINER_RUN_FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self._accumulation = args.gradient_accumulation_steps
        self._base_saved = False
        if self._accumulation > 1 and is_seq2seq_lm(model):
            warnings.warn(f"ZeroptimCallback: with gradient accumulation Trainer steps {type(model).__name__} along "
                          "the sum of its micro-batches' mean losses (the model takes num_items_in_batch but its "
                          "loss does not use it), not along the token-weighted mean over all of them that the "
                          "recorded steps are analysed with; each step records gradient_scale "
                          f"{self._accumulation} in its optimizer metadata", stacklevel=2)
        self._stop()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._stop()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, **kwargs: Any) -> None:
        self._stop()
        if self.wants(state.global_step) and model is not None:
            self._micro = []
            self._hooks = [model.register_forward_pre_hook(self._capture, with_kwargs=True),
                           model.register_forward_hook(self._after_forward, always_call=True)]

    def _stop(self) -> None:
        """No step is being recorded: the hooks are removed and the micro-batches dropped."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._micro = [], None

    def _after_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook, called even when the forward raised (then training stops: so does the recording)."""
        if sys.exc_info()[1] is not None:
            self._stop()

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: keep a training-mode call's tensors that have the examples' first dimension."""
        if self._micro is None or not module.training:
            return
        if len(self._micro) >= self._accumulation:  # more calls than the step accumulates: training stopped
            self._stop()
            return
        if args:
            raise ValueError("ZeroptimCallback records models called with keyword arguments, as Trainer calls them")
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if LABELS not in tensors:
            raise ValueError("ZeroptimCallback: the model was called without 'labels' (a compute_loss_func or "
                             "label smoothing takes them), so the step's loss is not the model's own")
        rows = tensors[LABELS].shape[0]
        self._micro.append({k: v.detach().cpu().clone() for k, v in tensors.items() if v.shape[0] == rows})

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                              **kwargs: Any) -> None:
        if self._micro is None or model is None or self.folder is None:
            return
        step = state.global_step
        names = [batch_name(step, i) for i in range(len(self._micro))]
        for name, micro in zip(names, self._micro):
            labels = micro.pop(LABELS)
            save_batch(self.folder / name, micro, labels)
        meta = self._meta(model, step, optimizer, args)
        meta.update(batch_entry(names))
        if "optimizer" in meta and len(names) > 1 and is_seq2seq_lm(model):  # stepped along Σ_i ∇f_i ≈ k·∇f
            meta["optimizer"][GRADIENT_SCALE] = len(names)
        if "base" in meta and not self._base_saved:
            save_base(self.folder / BASE_FILE, model, {"model": meta["model"]})
            self._base_saved = True
        save_checkpoint(self.folder / ckpt_name(step), model, meta, parts=self._parts(meta))
        if optimizer is not None:
            save_state(self.folder / state_name(step), model, getattr(optimizer, "optimizer", optimizer), step,
                       meta["optimizer"])

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                          **kwargs: Any) -> None:
        if self._micro is None or model is None or self.folder is None:
            return
        step = state.global_step
        # If step s+1 is recorded too, its own "before" checkpoint rewrites this file with its batches.
        meta = self._meta(model, step + 1, optimizer, args)
        save_checkpoint(self.folder / ckpt_name(step + 1), model, meta, parts=self._parts(meta))
        self.recorded.append(step)
        self._stop()

    @staticmethod
    def _parts(meta: dict[str, Any]) -> Literal["all", "trainable"]:
        """What a checkpoint holds: all but a peft model's frozen parameters, left to the recorded base."""
        return "trainable" if "base" in meta else "all"

    @staticmethod
    def _meta(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None,
              args: TrainingArguments) -> dict[str, Any]:
        adapter = adapter_spec(model)
        base = model.get_base_model() if adapter is not None else model  # type: ignore[operator]
        # a live config names no architecture until save_pretrained writes one: name the model's class
        config = {**base.config.to_dict(), "architectures": [type(base).__name__]}
        spec: dict[str, Any] = {SPEC_KEY: comparable_config(config)}
        meta: dict[str, Any] = {"step": step, "model": spec, "loss": MODEL_LOSS}
        if adapter is not None:  # the base's frozen weights are saved once (BASE_FILE), each checkpoint the rest
            spec[PEFT_KEY] = adapter
            meta["base"] = BASE_FILE
        if optimizer is not None:  # Trainer's is accelerate's wrapper around the torch optimizer
            meta["optimizer"] = optimizer_description(getattr(optimizer, "optimizer", optimizer))
            if args.max_grad_norm and args.max_grad_norm > 0:  # Trainer clips g by global norm before the step
                meta["optimizer"]["max_grad_norm"] = args.max_grad_norm
        return meta
