"""A model's skeleton: built with every parameter on the meta device (shapes and dtypes, no data), its
buffers real.

Inside ``skeleton()``, each parameter a module registers is replaced by an empty meta parameter of the same
shape, dtype and ``requires_grad`` as it is registered; the initialisers that run after (``reset_parameters``,
transformers' ``_init_weights``) then act on meta tensors and cost nothing, and tied weights stay tied (they
are one parameter object). Buffers are built as usual: non-persistent ones (rotary frequencies, causal masks)
are computed by the model's own code, as for a model built in memory. Only the building thread is affected.

Initialisers (``torch.nn.init``'s and the tensors' own ``normal_``, ``uniform_``, …) called on a meta tensor return
it untouched (``free_meta_initialisers``): there is nothing to write, and torch's meta kernel of ``normal_`` imports
``torch._dynamo`` on its first call, 1.5 s of every process that builds a model on the meta device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode


class _Building(threading.local):
    depth = 0


_BUILDING = _Building()


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if _BUILDING.depth == 0 or param is None or param.device.type == "meta":
        return None
    return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


#: The tensors' own in-place random fills, which initialisers call.
_FILLS = frozenset({Tensor.normal_, Tensor.uniform_, Tensor.bernoulli_, Tensor.exponential_, Tensor.log_normal_,
                    Tensor.cauchy_, Tensor.geometric_, Tensor.random_})


def _initialiser(func) -> bool:
    """Whether func is one of ``torch.nn.init``'s in-place initialisers (``normal_``, ``kaiming_uniform_``, …)."""
    name = getattr(func, "__name__", "")
    return getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and not name.startswith("_")


class _FreeMetaInitialisers(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        if isinstance(first, Tensor) and first.is_meta and (func in _FILLS or _initialiser(func)):
            return first
        return func(*args, **kwargs)


@contextlib.contextmanager
def free_meta_initialisers() -> Iterator[None]:
    """Inside the block, in this thread: an initialiser called on a meta tensor returns it untouched."""
    with _FreeMetaInitialisers():
        yield


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build models with their parameters on the meta device (this thread only) inside the block."""
    handle = register_module_parameter_registration_hook(_to_meta)
    _BUILDING.depth += 1
    try:
        with free_meta_initialisers():
            yield
    finally:
        _BUILDING.depth -= 1
        handle.remove()
