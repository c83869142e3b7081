"""Model registry and factories: rebuilding a model from checkpoint metadata or a ``--model`` spec.

A model spec is ``{"name": "mlp", "kwargs": {...}}`` (a built-in), ``{"factory": "pkg.mod:fn",
"kwargs": {...}}`` (a function returning an ``nn.Module``) or ``{"hf_config": {...}}`` (a transformers
config, built by transformers' own classes: ``models.hf``; with ``"peft": {...}`` beside it, a LoRA adapter
on that model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.hf import SPEC_KEY, TRANSFORMERS_LOCK
from zeroptim_cli.io.peft import PEFT_KEY
from zeroptim_cli.io.specs import Trust, load_callable, metadata_callable
from zeroptim_cli.models.cnn import CNN
from zeroptim_cli.models.hf import build_hf_model
from zeroptim_cli.models.mlp import MLP
from zeroptim_cli.models.transformer import CharTransformer


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18, randomly initialised (needs the ``vision`` extra)."""
    try:
        from torchvision.models import resnet18 as tv_resnet18
    except ImportError as exc:
        raise ZeroptimError("model 'resnet18' needs torchvision: pip install 'zeroptim[vision]'") from exc
    model = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "char_transformer": CharTransformer,
    "resnet18": resnet18,
}


def build_model(spec: dict[str, Any] | None, override: str | None = None, base_dir: Path | None = None, *,
                trust: Trust = Trust(), source: Path | None = None) -> nn.Module:
    """Build the model named by ``override`` (a built-in name or a factory spec the user gave) or else by
    the metadata ``spec`` of the checkpoint ``source``.

    The function is called with the metadata's ``kwargs`` when there are any, else with no arguments. A
    factory named only in the metadata runs only if ``trust`` allows it (``io.specs.Trust``).
    """
    kwargs = dict((spec or {}).get("kwargs") or {})
    if override is not None:
        if override not in REGISTRY and ":" not in override:
            raise ConfigError(f"--model '{override}' is neither a built-in model ({', '.join(REGISTRY)}) nor a "
                              "factory 'path/to/file.py:function' or 'package.module:function'")
        fn = REGISTRY[override] if override in REGISTRY else load_callable(override, "--model", base_dir)
        what = f"--model '{override}'"
    elif spec is None:
        raise ConfigError("no model: the checkpoint has no 'zeroptim' model metadata; pass --model file.py:function")
    elif "name" in spec:
        if spec["name"] not in REGISTRY:
            raise ZeroptimError(f"unknown model '{spec['name']}' in the metadata of '{source}' "
                                f"(known: {', '.join(REGISTRY)})")
        fn, what = REGISTRY[spec["name"]], f"model '{spec['name']}'"
    elif SPEC_KEY in spec:
        fn, what = functools.partial(build_hf_model, spec[SPEC_KEY], spec.get(PEFT_KEY)), f"the '{SPEC_KEY}' model spec"
    elif "factory" in spec:
        fn = metadata_callable(spec["factory"], "model factory", "--model", source or Path("checkpoint"), trust, base_dir)
        what = f"factory '{spec['factory']}' named in '{source}'"
    else:
        raise ZeroptimError(f"the metadata 'model' of '{source}' needs a 'name', a 'factory' or an '{SPEC_KEY}'")
    try:
        with TRANSFORMERS_LOCK:  # no model is built while transformers loads a folder in another thread
            model = fn(**kwargs)
    except ZeroptimError:
        raise
    except Exception as exc:
        raise ZeroptimError(f"{what} failed to build the model ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise ZeroptimError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    return model
