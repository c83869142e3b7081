"""torch.func's first call in a process, made without leaving its frames to Python's cyclic collector.

torch.func's transforms (``jvp``, and ``grad`` through it) import ``torch._dynamo`` on their first call in a
process, and that import leaves reference cycles that hold the frame it was made from, and so every frame
below it with their tensors — the first pair's inputs, coefficients and graph — until the cyclic collector
next runs. ``import_dynamo`` makes that import before the transform runs, and collects its cycles.
"""

from __future__ import annotations

import gc
import sys


def import_dynamo() -> None:
    """Import ``torch._dynamo`` (once per process) and free the cycles its import leaves behind."""
    if "torch._dynamo" not in sys.modules:
        import torch._dynamo  # noqa: F401 - imported for its side effect on sys.modules
        gc.collect()
