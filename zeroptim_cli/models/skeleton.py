"""A model's skeleton: built with every parameter on the meta device (shapes and dtypes, no data), its
buffers real.

Inside ``skeleton()``, each parameter a module registers is replaced by an empty meta parameter of the same
shape, dtype and ``requires_grad`` as it is registered; the initialisers that run after (``reset_parameters``,
transformers' ``_init_weights``) then act on meta tensors and cost nothing, and tied weights stay tied (they
are one parameter object). Buffers are built as usual: non-persistent ones (rotary frequencies, causal masks)
are computed by the model's own code, as for a model built in memory. Only the building thread is affected.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook


class _Building(threading.local):
    depth = 0


_BUILDING = _Building()


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if _BUILDING.depth == 0 or param is None or param.device.type == "meta":
        return None
    return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build models with their parameters on the meta device (this thread only) inside the block."""
    handle = register_module_parameter_registration_hook(_to_meta)
    _BUILDING.depth += 1
    try:
        yield
    finally:
        _BUILDING.depth -= 1
        handle.remove()
