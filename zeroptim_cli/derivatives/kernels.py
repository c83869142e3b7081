"""Attention kernels that can be differentiated twice and in forward mode, safe when analyses overlap.

The fused SDPA kernels (flash, memory-efficient, cuDNN) and the ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` fast path implement neither double backward nor forward-mode AD (nor have
Taylor rules), so every method routes attention through SDPA's math backend, built of ordinary ops.

Both switches are process-wide in torch, so two analyses in two threads must not each save and restore
them (the first to leave would turn the fused kernels back on under the other, the last would restore the
other's "math only" for good). Instead the first analysis to enter saves the settings and sets them, the
last to leave restores them: a count of the analyses running, under a lock. While any analysis runs, the
whole process uses the math kernel.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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
