"""The base of zeroptim's own dispatch modes: a ``TorchDispatchMode`` that torch leaves unwrapped for dynamo.

torch wraps the ``__torch_dispatch__`` of every ``TorchDispatchMode`` subclass in ``torch._disable_dynamo``, whose
first call imports ``torch._dynamo``: 0.55 s once per process (measured on top of the ``torch.distributed.tensor``
import that the first subclass dispatch pays; 1.09 s for a bare mode's first op against 0.54 s for that import
alone), which a one-pair ``zeroptim analyze`` paid in its f(w_t1) forward. These modes run only in eager
evaluations of f that zeroptim itself makes, never under ``torch.compile``, so the wrapping buys nothing.

Private torch API used here: ``torch.utils._python_dispatch.TorchDispatchMode`` and its ``_should_skip_dynamo``
(the switch torch's own docstring shows for turning the wrapping off).
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["EagerDispatchMode"]


class EagerDispatchMode(TorchDispatchMode):
    """A ``TorchDispatchMode`` whose subclasses' ``__torch_dispatch__`` torch does not wrap for dynamo."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False
