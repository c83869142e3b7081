"""Attention kernels that can be differentiated twice and in forward mode, safe when analyses overlap.

The fused SDPA kernels (flash, memory-efficient, cuDNN) and the ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` fast path implement neither double backward nor forward-mode AD (nor have
Taylor rules), so every method routes attention through SDPA's math backend, built of ordinary ops.

Both switches are process-wide in torch, so two analyses in two threads must not each save and restore
them (the first to leave would turn the fused kernels back on under the other, the last would restore the
other's "math only" for good). Instead the first analysis to enter saves the settings and sets them, the
last to leave restores them: a count of the analyses running, under a lock. While any analysis runs, the
whole process uses the math kernel.

A loss value alone needs no derivative: ``fused_attention_values`` (a thread-local torch-function mode) sends the
calls of SDPA made with grad mode off, on CPU, to its fused flash kernel directly (the process-wide switches
choose among backends only; an explicit call of one is not affected), which forms no L×S score matrix, where
the call is one it computes as the math kernel does, to rounding (softmax(s·qkᵀ + mask) v; ``_flash_cpu`` says
which); every other call runs as it would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["twice_differentiable_kernels", "fused_attention_values", "sdpa_arguments", "SDPA"]

#: ``F.scaled_dot_product_attention`` as ``__torch_function__`` sees it
SDPA = torch._C._nn.scaled_dot_product_attention
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

_LOCK = threading.Lock()
_running = 0  # analyses inside ``twice_differentiable_kernels``
_restore = contextlib.ExitStack()  # undoes the settings of the first analysis in


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Route attention through kernels with double backward and forward-mode AD for the block; the process's
    own settings come back exactly when the last overlapping block ends (module docstring)."""
    global _running
    with _LOCK:
        if _running == 0:
            fastpath = torch.backends.mha.get_fastpath_enabled()
            _restore.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
            _restore.enter_context(sdpa_kernel(SDPBackend.MATH))
            torch.backends.mha.set_fastpath_enabled(False)
        _running += 1
    try:
        yield
    finally:
        with _LOCK:
            _running -= 1
            if _running == 0:
                _restore.close()


def sdpa_arguments(args: tuple, kwargs: dict) -> dict | None:
    """The arguments of an SDPA call by name, defaults filled in; None for a call this module does not parse."""
    if len(args) > len(_SDPA_NAMES) or set(kwargs) - set(_SDPA_NAMES):
        return None
    given = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_NAMES, args)), **kwargs}
    if not all(isinstance(given.get(n), Tensor) for n in _SDPA_NAMES[:3]):
        return None
    return given


def _flash_cpu(args: tuple, kwargs: dict) -> Tensor | None:
    """SDPA by the fused CPU flash kernel, or None where it would not compute what the math kernel does: grad
    mode on, dropout; anything but plain (non-subclass) 4-d CPU tensors of one float32/float64 dtype with one
    batch size, one head dimension, key and value heads alike (a multiple of them in the query's, under
    ``enable_gqa``), contiguous last dimensions and at least one query and key (the kernel neither broadcasts
    nor handles strides or empty sequences); a mask other than 2-d or 4-d, or of another dtype."""
    a = sdpa_arguments(args, kwargs)
    if a is None or torch.is_grad_enabled() or a["dropout_p"] != 0.0:
        return None
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if any(type(t) is not Tensor or t.device.type != "cpu" or t.dtype != q.dtype for t in tensors) or \
            q.dtype not in (torch.float32, torch.float64) or not q.dim() == k.dim() == v.dim() == 4 or \
            not q.shape[0] == k.shape[0] == v.shape[0] or k.shape[1] != v.shape[1] or \
            not q.shape[-1] == k.shape[-1] == v.shape[-1] or any(t.stride(-1) != 1 for t in (q, k, v)) or \
            q.shape[-2] == 0 or k.shape[-2] == 0 or (mask is not None and mask.dim() not in (2, 4)):
        return None
    if k.shape[1] != q.shape[1]:
        if not a["enable_gqa"] or q.shape[1] % k.shape[1]:
            return None
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, bool(a["is_causal"]), attn_mask=mask, scale=a["scale"])[0]


class _FlashValues(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            out = _flash_cpu(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def fused_attention_values() -> Iterator[None]:
    """For the block, in this thread: SDPA calls with grad mode off on CPU run the fused flash kernel (module
    docstring); everything else runs as it would."""
    with _FlashValues():
        yield
