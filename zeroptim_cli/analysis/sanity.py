"""Pair sanity: what makes a pair of checkpoints look wrong although it can still be computed.

Each finding is one line for the result's ``warnings`` list: the steps out of order or not consecutive,
two different runs (recorded run ids or optimizers differ), parameters stored in different dtypes in the
two files, a zero step (Δ = 0: both hold the same weights; at a recorded learning rate of 0, as at the start
of a warmup, that is said), a step the training loop took along c·∇f instead of ∇f (the checkpoint's
``optimizer.gradient_scale``, as Trainer's sum of micro-batch means), and a BatchNorm model analysed in eval mode whose checkpoints were recorded in train mode.
"""

from __future__ import annotations

import torch
from torch import nn

from zeroptim_cli.io.checkpoint import Checkpoint
from zeroptim_cli.io.layout import gradient_scale


def pair_warnings(ckpt_t: Checkpoint, ckpt_t1: Checkpoint, model: nn.Module, train: bool,
                  update_norm: float | None = None) -> list[str]:
    """The warnings of the module docstring for the pair ``ckpt_t`` → ``ckpt_t1`` of ``model``; ``update_norm``
    (‖Δ‖, where an analysis has it: a streamed pair's checkpoints hold no tensor data) tells a zero step
    without comparing the tensors."""
    out: list[str] = []
    s, s1 = ckpt_t.step, ckpt_t1.step
    if s is not None and s1 is not None:
        if s1 <= s:
            out.append(f"step_t1 {s1} is not after step_t {s}: are the checkpoints swapped?")
        elif s1 != s + 1:
            out.append(f"steps {s} → {s1} are not consecutive: Δ spans {s1 - s} optimizer steps")
    for key, what in (("run_id", "run ids"), ("optimizer", "optimizers")):
        a, b = ckpt_t.meta.get(key), ckpt_t1.meta.get(key)
        if key == "optimizer":
            a, b = (a or {}).get("name"), (b or {}).get("name")
        if a is not None and b is not None and a != b:
            out.append(f"the checkpoints come from different runs: their {what} differ ({a} and {b})")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    mixed = sorted(n for n in params & set(ckpt_t.tensors) & set(ckpt_t1.tensors)
                   if ckpt_t.tensors[n].dtype != ckpt_t1.tensors[n].dtype)
    if mixed:
        n = mixed[0]
        out.append(f"parameters are stored in different dtypes in the two files ('{n}': "
                   f"{str(ckpt_t.tensors[n].dtype)[6:]} and {str(ckpt_t1.tensors[n].dtype)[6:]})")
    shared = params & set(ckpt_t.tensors) & set(ckpt_t1.tensors)
    if update_norm == 0 if update_norm is not None else (
            shared and all(torch.equal(ckpt_t.tensors[n], ckpt_t1.tensors[n]) for n in shared)):
        lr = ckpt_t.learning_rate
        out.append("the step is zero (Δ = 0: both checkpoints hold the same weights), so gᵀΔ, ΔᵀHΔ and every ratio to "
                   "‖Δ‖ say nothing" + ("; the recorded learning rate is 0, as at the start of a learning-rate "
                                         "warmup" if lr == 0 else ""))
    scale = gradient_scale(ckpt_t.meta.get("optimizer"))  # checked when the checkpoint was read
    if scale != 1:
        out.append(f"the step was taken along {scale:g}·∇f, not ∇f (f the mean over the step's batches analysed "
                   f"here): the training loop summed its micro-batches' mean losses (recorded optimizer."
                   f"gradient_scale {scale:g}), so gᵀΔ and ΔᵀHΔ are of f while the step followed {scale:g}·g, "
                   f"exactly when the micro-batches count the same targets (for plain SGD gᵀΔ = −η·{scale:g}·‖g‖²); "
                   "the recorded optimizer's step is taken again with that gradient")
    recorded_train = ckpt_t.meta.get("train_mode")
    if (not train and recorded_train
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())):
        out.append("the model has BatchNorm and was recorded in train mode, but is analysed in eval mode "
                   "(running statistics); pass --train-mode to use batch statistics as the step did")
    return out
