"""Losses: a mean loss over a batch, plus the count that weights the batch when several are averaged.

With batches b of counts n_b, the objective is f = Σ_b n_b f_b / Σ_b n_b: the mean over every example
(for token-level losses, every counted token) of every batch. Targets equal to −100 (``IGNORE_INDEX``)
count for nothing in the cross-entropies, in f_b and in n_b alike, so that f is exactly the mean over
the counted tokens of all batches however the padding falls.

    cross_entropy:  f_b = mean over counted t of −log softmax(z_t)[y_t]              (y_t ≠ −100)
    causal_lm:      f_b = mean over counted t of −log softmax(z_{t−1})[y_t],  t ≥ 1   (next token)
    mse:            f_b = mean of (z − y)²,  n_b = examples

``model`` is the model's own loss as transformers defines it for the model's kind (``model_loss``),
computed here from ``.logits`` in the run's dtype rather than taken from ``outputs.loss``: transformers
upcasts logits with ``.float()``, which would quietly turn a float64 analysis partly float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import IGNORE_INDEX, Batch
from zeroptim_cli.io.specs import Trust, load_callable, metadata_callable
from zeroptim_cli.models.hf import is_seq2seq_lm, loss_kind

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _examples(targets: Tensor) -> int:
    return int(targets.shape[0])


def _never(targets: Tensor) -> bool:
    return False


@dataclass(frozen=True)
class Loss:
    """A named mean loss ``fn(outputs, targets)``; ``count(targets)``, its averaging weight (examples or
    counted tokens); ``per_token(targets)``, whether that count counts tokens (the JSON's ``num_tokens``);
    ``check(batch)``, a refusal of batches the loss would score wrongly; ``known``, whether ``count`` is
    known to be what ``fn`` averages over (built-in losses), so that chunks of a batch weighted by it sum
    to the batch's loss exactly — a user's ``MODULE:FN`` is only assumed to average over examples."""

    name: str
    fn: LossFn
    count: Callable[[Tensor], int] = _examples
    per_token: Callable[[Tensor], bool] = _never
    check: Callable[[Batch], None] | None = None
    known: bool = True

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)

    def validate(self, batch: Batch) -> None:
        """Refuse a batch this loss would score wrongly (``check``) or not at all (no counted target)."""
        if self.check is not None:
            self.check(batch)
        if self.count(batch.targets) == 0:
            raise ZeroptimError(f"batch '{batch.source}' has no counted target for loss '{self.name}' "
                                f"(every target is {IGNORE_INDEX}, or none is left after the shift)")


def logits_of(outputs: object) -> torch.Tensor:
    """The prediction tensor of a model's output: the tensor itself, the first of a tuple or list, or the
    ``logits`` of a dict or of an output object (as Hugging Face models return)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits  # type: ignore[no-any-return]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ZeroptimError(f"the model returned {type(outputs).__name__}; the built-in losses need a tensor, a tuple "
                        "starting with one, or an object with .logits (or pass --loss MODULE:FN)")


def _class_targets(name: str, targets: Tensor) -> Tensor:
    """Integer class targets (int64, int32, uint8, … as a file or a collator stores them) as the int64
    that torch's cross-entropy takes; real-valued or boolean targets are an error."""
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ZeroptimError(f"{name} needs integer class targets, not {str(targets.dtype).removeprefix('torch.')}; "
                            "use --loss mse for real-valued targets")
    return targets.long()


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) against classes (N,), or (N, T, C) against (N, T) per token,
    over the targets that are not −100."""
    outputs = logits_of(outputs)
    if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        raise ZeroptimError(
            f"cross_entropy needs logits (N, C) with targets (N,) or (N, T, C) with (N, T); "
            f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
        )
    targets = _class_targets("cross_entropy", targets)
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def causal_lm(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits (N, T, C) against token ids (N, T): logits[:, :−1] scored against
    targets[:, 1:], −100 ignored, the mean over the counted tokens (as transformers' causal LMs shift
    their labels, computed in the logits' own dtype)."""
    outputs = logits_of(outputs)
    if outputs.dim() != 3 or targets.dim() != 2 or outputs.shape[:2] != targets.shape:
        raise ZeroptimError(f"causal_lm needs logits (N, T, C) with targets (N, T); got outputs "
                            f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}")
    targets = _class_targets("causal_lm", targets)
    return F.cross_entropy(outputs[:, :-1].reshape(-1, outputs.shape[-1]), targets[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; targets must have the outputs' shape (or its numel)."""
    outputs = logits_of(outputs)
    if outputs.shape != targets.shape:
        if outputs.numel() != targets.numel():
            raise ZeroptimError(f"mse: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in size")
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def counted(targets: Tensor) -> int:
    """Targets that are not −100."""
    return int((targets != IGNORE_INDEX).sum())


def counted_after_shift(targets: Tensor) -> int:
    """Targets from the second position on that are not −100: the next tokens a causal LM is scored on."""
    return counted(targets[:, 1:]) if targets.dim() == 2 else 0


def _sequences(targets: Tensor) -> bool:
    return targets.dim() >= 2


def _always(targets: Tensor) -> bool:
    return True


def refuse_unshifted(batch: Batch) -> None:
    """Token targets equal to the token inputs (wherever counted) make cross_entropy score every token
    against itself, a silent wrong answer for a language-model batch: refuse it and point to causal_lm.
    A batch whose targets are also the next inputs (rows of one repeated token) is left alone: it reads as
    shifted just as well."""
    inputs, targets = batch.input_ids, batch.targets
    if inputs is None or targets.dim() < 2 or inputs.shape != targets.shape or inputs.is_floating_point():
        return
    mask = targets != IGNORE_INDEX
    nxt = mask[:, :-1]
    if bool(mask.any()) and torch.equal(inputs[mask], targets[mask]) and \
            not torch.equal(inputs[:, 1:][nxt], targets[:, :-1][nxt]):
        raise ZeroptimError(f"batch '{batch.source}': the targets equal the input tokens, so cross_entropy would score "
                            "every token against itself; for a language model use --loss causal_lm (next-token, "
                            "shifted as transformers does)")


CROSS_ENTROPY = Loss("cross_entropy", cross_entropy, counted, _sequences, refuse_unshifted)
CAUSAL_LM = Loss("causal_lm", causal_lm, counted_after_shift, _always)

BUILTIN_LOSSES = {
    "cross_entropy": CROSS_ENTROPY,
    "mse": Loss("mse", mse),
    "causal_lm": CAUSAL_LM,
}

#: The model's own loss (``--loss model``), the default for a batch of keyword arguments with labels.
MODEL_LOSS = "model"


def default_loss(batches: Sequence[Batch]) -> str:
    """The loss to use when neither ``--loss`` nor the metadata names one: the model's own loss for
    keyword-argument batches (they hold ``labels``, as a Hugging Face model takes them), else cross_entropy."""
    return MODEL_LOSS if any(b.keyword for b in batches) else "cross_entropy"


def resolve_loss(spec: str, model: nn.Module | None = None) -> Loss:
    """``cross_entropy``, ``mse``, ``causal_lm``, ``model`` (the model's own loss, which needs ``model``), or
    ``MODULE:FN`` (a mean loss; batches are then weighted by examples)."""
    if spec in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[spec]
    if spec == MODEL_LOSS:
        if model is None:
            raise ConfigError("--loss model needs the model it is the loss of")
        return model_loss(model)
    if ":" not in spec:
        raise ConfigError(f"--loss '{spec}' is not a known loss ({', '.join(BUILTIN_LOSSES)}, {MODEL_LOSS}) "
                          "nor a MODULE:FN spec")
    return Loss(spec, load_callable(spec, "--loss"), known=False)


def resolve_metadata_loss(spec: str, source: Path, trust: Trust, model: nn.Module | None = None) -> Loss:
    """The loss a checkpoint's metadata names: a built-in name (``model`` included) freely, a ``MODULE:FN``
    spec only as ``trust`` allows (it would run code); anything else is bad data of ``source`` (exit 1), not a
    bad flag."""
    if spec in BUILTIN_LOSSES or spec == MODEL_LOSS:
        return resolve_loss(spec, model)
    if ":" not in spec:
        raise ZeroptimError(f"'{source}' names the loss '{spec}' in its metadata, which is not a known loss "
                            f"({', '.join(BUILTIN_LOSSES)}, {MODEL_LOSS}); pass --loss to choose one")
    return Loss(spec, metadata_callable(spec, "loss", "--loss", source, trust, source.parent), known=False)


#: transformers' ``loss_type`` of classifiers of a whole sequence, image, video or sound clip.
_CLASSIFIERS = ("ForSequenceClassification", "ForImageClassification", "ForVideoClassification",
                "ForAudioClassification")


def model_loss(model: nn.Module) -> Loss:
    """The loss a transformers model computes from its ``labels``, by its kind (``models.hf.loss_kind``):

    * ``ForCausalLM``: ``causal_lm`` (labels shifted inside the model, −100 ignored);
    * ``ForMaskedLM``, ``ForTokenClassification``: ``cross_entropy`` over every position, −100 ignored;
    * ``For{Sequence,Image,Video,Audio}Classification``: by ``config.problem_type`` (``classification``);
    * an encoder-decoder language model (``models.hf.is_seq2seq_lm``: T5, BART, … ``ForConditionalGeneration``):
      ``cross_entropy`` of the decoder's logits against the labels, every position, −100 ignored, as
      their ``CrossEntropyLoss`` does; the decoder reads the labels shifted right
      (``models.hf.with_decoder_inputs``, applied to every batch the objective is built on).

    Other kinds and models that add a router loss are refused rather than approximated.
    """
    kind, config, cls = loss_kind(model), getattr(model, "config", None), type(model).__name__
    if config is None or kind is None:
        raise ZeroptimError(f"the model's own loss ('{MODEL_LOSS}', the default for a batch with labels) needs a "
                            f"transformers model with a known loss; {cls} is none: pass --loss")
    if getattr(config, "output_router_logits", False):
        raise ZeroptimError(f"the own loss of {cls} adds a router auxiliary loss, which zeroptim does not reproduce; "
                            "pass --loss (causal_lm for a causal language model's loss alone)")
    if is_seq2seq_lm(model) or kind in ("ForMaskedLM", "ForTokenClassification"):
        return Loss(f"{MODEL_LOSS} ({cls}: cross_entropy)", cross_entropy, counted, _always)
    if kind == "ForCausalLM":
        return replace(CAUSAL_LM, name=f"{MODEL_LOSS} ({cls}: causal_lm)")
    if kind in _CLASSIFIERS:
        num_labels, problem = int(config.num_labels), config.problem_type
        return Loss(f"{MODEL_LOSS} ({cls})", lambda outputs, targets: classification(outputs, targets, num_labels, problem),
                    lambda targets: _classification_count(targets, num_labels, problem))
    raise ZeroptimError(f"the own loss of {cls} (loss type {kind}) is not one zeroptim reproduces; pass --loss")


def problem_type(targets: Tensor, num_labels: int, problem: str | None) -> str:
    """transformers' rule when ``config.problem_type`` is unset: one label → regression, integer labels →
    single-label classification, else multi-label."""
    if problem is not None:
        return problem
    if num_labels == 1:
        return "regression"
    return "single_label_classification" if targets.dtype in (torch.long, torch.int) else "multi_label_classification"


def classification(outputs: Tensor, targets: Tensor, num_labels: int, problem: str | None) -> Tensor:
    """A sequence or image classifier's loss, as transformers' ``ForSequenceClassificationLoss``: MSE
    (regression), cross-entropy over the classes with −100 ignored (single label), or binary
    cross-entropy with logits over every label (multi-label)."""
    logits = logits_of(outputs)
    kind = problem_type(targets, num_labels, problem)
    if kind == "regression":
        targets = targets.to(logits.dtype)
        return F.mse_loss(logits.squeeze(), targets.squeeze()) if num_labels == 1 else F.mse_loss(logits, targets)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX)
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    raise ZeroptimError(f"problem type '{kind}' is not one transformers defines")


def _classification_count(targets: Tensor, num_labels: int, problem: str | None) -> int:
    single = problem_type(targets, num_labels, problem) == "single_label_classification"
    return counted(targets) if single else _examples(targets)
