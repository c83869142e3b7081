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

#: the public API, each name imported from its module on first use (so that ``zeroptim --help`` and the
#: errors need no torch)
_EXPORTS = {
    "Batch": "zeroptim_cli.io.batches", "load_batch": "zeroptim_cli.io.batches",
    "Checkpoint": "zeroptim_cli.io.checkpoint", "load_checkpoint": "zeroptim_cli.io.checkpoint",
    "save_checkpoint": "zeroptim_cli.io.checkpoint",
    "Evaluation": "zeroptim_cli.derivatives.evaluation", "Extras": "zeroptim_cli.analysis.extras", "PairAnalysis": "zeroptim_cli.analysis.result",
    "Settings": "zeroptim_cli.analysis.checkpoints", "analyze_files": "zeroptim_cli.analysis.checkpoints",
    "analyze_pair": "zeroptim_cli.analysis.pair", "resolve_loss": "zeroptim_cli.derivatives.losses",
    "Recorder": "zeroptim_cli.training.recorder", "ZeroptimError": "zeroptim_cli.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zeroptim_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
