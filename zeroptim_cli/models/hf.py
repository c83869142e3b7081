"""Hugging Face models built from their config by transformers' own classes.

``{"hf_config": config}`` (a ``config.json`` as a JSON object) builds ``cls(cls.config_class.from_dict(config))``
with ``cls`` the transformers class the config names in ``architectures`` (``io.hf.model_class``): no
``trust_remote_code``, no code of the checkpoint's. ``{"hf_config": config, "peft": adapter}`` is that model
with a peft LoRA adapter on it (``io.peft``). The weights are those of the checkpoint, so the random
initialisation of the build is never used.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.batches import Batch
from zeroptim_cli.io.hf import model_class, quiet_transformers
from zeroptim_cli.io.peft import PEFT_KEY, apply_adapter

#: Keyword arguments that already give an encoder-decoder's decoder its inputs.
_DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def build_hf_model(config: dict[str, Any], adapter: dict[str, Any] | None = None,
                   source: str = "checkpoint metadata 'hf_config'") -> nn.Module:
    """The transformers model ``config`` describes, randomly initialised; with ``adapter`` (a peft adapter
    config, the spec's ``peft``), that model with the adapter on it as peft builds it (``io.peft``): the
    base's parameters frozen, the adapter's trainable."""
    if not isinstance(config, dict):
        raise ZeroptimError(f"{source} must be a JSON object (a transformers config)")
    cls = model_class(config, source)
    with quiet_transformers():
        model = cls(cls.config_class.from_dict(config))
    return model if adapter is None else apply_adapter(model, adapter, f"checkpoint metadata '{PEFT_KEY}'")


def loss_kind(model: nn.Module) -> str | None:
    """The kind of loss a transformers model computes from ``labels``: its ``loss_type`` (which transformers
    reads from the class name, e.g. ``ForCausalLM``), or ``ForCausalLM`` for a class transformers registers
    as a causal LM under another name (``GPT2LMHeadModel``: its ``loss_function`` falls back to the causal-LM
    loss, and Trainer shifts its labels too); None for anything else. A peft model's is its base model's."""
    if hasattr(model, "get_base_model") and getattr(model, "peft_config", None) is not None:
        model = model.get_base_model()
    kind = getattr(model, "loss_type", None)
    if kind is not None or getattr(model, "config", None) is None:
        return kind
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return "ForCausalLM" if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else None


def is_seq2seq_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers encoder-decoder language model (T5, BART, Marian, …
    ``ForConditionalGeneration``): ``config.is_encoder_decoder`` and a ``prepare_decoder_input_ids_from_labels``,
    the decoder reading the labels shifted right. (Their classifiers make decoder inputs from
    ``input_ids`` instead, and have a classifier's loss.)"""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and hasattr(model, "prepare_decoder_input_ids_from_labels")


def with_decoder_inputs(model: nn.Module, batch: Batch) -> Batch:
    """The batch as an encoder-decoder language model is called with it: a keyword batch without decoder
    inputs gets ``decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)``, the labels
    shifted one position right behind ``decoder_start_token_id`` with −100 read as the pad token, which is
    what the model builds for itself when it is called with ``labels`` (our batches never pass them to the
    model). Any other model or batch is returned as it is."""
    if not (batch.keyword and is_seq2seq_lm(model)) or any(k in batch.inputs for k in _DECODER_INPUTS):
        return batch
    with quiet_transformers():
        decoder = model.prepare_decoder_input_ids_from_labels(labels=batch.targets)
    return Batch({**batch.inputs, "decoder_input_ids": decoder}, batch.targets, batch.source)
