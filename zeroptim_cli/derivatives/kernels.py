"""Attention kernels that can be differentiated twice and in forward mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Route attention through kernels with double backward and forward-mode AD.

    The fused SDPA kernels (flash, memory-efficient, cuDNN) and the ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` fast path implement neither, so HVPs through them fail; the math
    SDPA backend is built of ordinary differentiable ops. Global settings are restored on exit.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
