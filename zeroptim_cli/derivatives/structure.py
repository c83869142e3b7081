"""What the sizes of a model's activations depend on besides its inputs' shapes: the model's structure and
the attention kernels in force, as a hashable key (``structure_key``). ``chunk_size="auto"`` keeps the chunk
lengths it measured under this key (``objective.probe_key``), so that models built alike — a sweep's, one per
checkpoint — are measured once.

A module's structure is its class and its plain settings: the attributes that are numbers, strings, flags or
tuples of them (a layer's sizes, heads, strides, epsilon, mode), which is where ``nn.Module``\\s and most
models keep what shapes their activations. A Hugging Face model reads its settings from its config at run
time instead (its attention implementation too), so each config met on the way is part of the key, whole.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

_PLAIN = (bool, int, float, str, type(None))
#: What every ``nn.Module`` holds of its own (hooks, its parameters', buffers' and children's tables) and no
#: setting of a layer: skipped unread, most of a small layer's attributes (``training`` is kept).
_MODULE_OWN = frozenset(nn.Module().__dict__) - {"training"}


def _settings(module: nn.Module) -> tuple:
    """The module's plain settings, (name, value) in the order they were set (a tuple or list of plain values
    as a tuple)."""
    out = []
    for k, v in module.__dict__.items():
        if k in _MODULE_OWN:
            continue
        if isinstance(v, _PLAIN):
            out.append((k, v))
        elif isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v):
            out.append((k, tuple(v)))
    return tuple(out)


def _config(config: Any) -> tuple:
    """A Hugging Face config as a key: its class, attention implementation and every field."""
    fields = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return type(config), getattr(config, "_attn_implementation", None), fields


def kernel_state() -> tuple:
    """The process's attention settings that change what attention saves: the SDPA backends enabled (a
    twice-differentiable block, ``kernels.twice_differentiable_kernels``, leaves only the math one) and
    nn.MultiheadAttention's fast path."""
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled(),
            torch.backends.mha.get_fastpath_enabled())


def structure_key(model: nn.Module) -> tuple | None:
    """Every module's name, class and plain settings, each config once, and ``kernel_state``; None where a
    config cannot be read (the model is then measured every time)."""
    modules, configs = [], {}
    for name, module in model.named_modules():
        modules.append((name, type(module), _settings(module)))
        config = module.__dict__.get("config")
        if config is not None and id(config) not in configs and callable(getattr(config, "to_dict", None)):
            try:
                configs[id(config)] = _config(config)
            except Exception:  # noqa: BLE001 - a config that cannot be written out: nothing is kept
                return None
    return tuple(modules), tuple(configs.values()), kernel_state()
