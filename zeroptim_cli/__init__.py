"""zeroptim: why an optimizer step moved the loss the way it did.

For a step Δ = w_{t+1} − w_t and a batch loss f, zeroptim computes the gradient correlation ∇f(w_t)ᵀΔ,
the directional sharpness Δᵀ∇²f(w_t)Δ and the second-order Taylor decomposition
f(w_{t+1}) − f(w_t) = ∇fᵀΔ + ½ΔᵀHΔ + residual (Pan & Li 2023, arXiv 2306.00204).

The library works without the CLI::

    from zeroptim_cli import analyze_pair, Batch, resolve_loss
    result = analyze_pair(model, params_t, params_t1, [Batch(x, y)], resolve_loss("cross_entropy"))
    print(result.to_dict()["dir_sharpness_normalized"])
"""

import os as _os
import sys as _sys

# ``python -m zeroptim_cli`` (as torchrun runs it) puts the working directory first on sys.path, and it is
# often a checkpoint folder: a file there named like a module (dataclasses.py, json.py) would run as code
# the moment anything imports that module. The package is found by now, so the entry goes before any
# other import does (while Python looks the module up, sys.argv[0] is "-m").
if _sys.argv[:1] == ["-m"] and _sys.path and _sys.path[0] in ("", _os.getcwd()):
    del _sys.path[0]

from zeroptim_cli._version import __version__  # noqa: E402
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.analysis.pair import analyze_pair
from zeroptim_cli.analysis.result import PairAnalysis
from zeroptim_cli.derivatives.losses import resolve_loss
from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.batches import Batch, load_batch
from zeroptim_cli.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from zeroptim_cli.training.recorder import Recorder

__all__ = [
    "__version__",
    "Batch",
    "Checkpoint",
    "Extras",
    "PairAnalysis",
    "Recorder",
    "Settings",
    "ZeroptimError",
    "analyze_files",
    "analyze_pair",
    "load_batch",
    "load_checkpoint",
    "resolve_loss",
    "save_checkpoint",
]
