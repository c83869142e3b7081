"""``zeroptim train``: a small, seeded training loop that records consecutive checkpoint pairs.

A config (YAML, every key optional) — the defaults train the notebook's MLP on the shipped MNIST digits::

    seed: 0
    device: cpu            # auto | cpu | cuda | cuda:N
    dtype: float32         # float32 | float64
    steps: 200
    batch_size: 128
    dataset: {name: mnist_5k}          # text (path, block_size) | mnist | fashion_mnist | cifar10 (root, download)
    model: {name: mlp, kwargs: {}}     # cnn | char_transformer | resnet18; sizes that follow from the data are filled in
    optimizer: {name: sgd, lr: 0.1}    # adam, adamw, adafactor, lion, signsgd, normalized_sgd; clip: {fraction, target}
    loss: cross_entropy
    record: {every: 100, steps: [], optimizer_state: false}   # steps 0, 100, …; each writes ckpts s and s+1
    out: runs/mlp_sgd
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from zeroptim_cli.derivatives.losses import resolve_loss
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.models import REGISTRY, build_model
from zeroptim_cli.runtime import DTYPES, resolve_device
from zeroptim_cli.training.data import load_dataset
from zeroptim_cli.training.optimizers import build_optimizer
from zeroptim_cli.training.recorder import Recorder

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",
    "steps": 200,
    "batch_size": 128,
    "dataset": {"name": "mnist_5k"},
    "model": {"name": "mlp", "kwargs": {}},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "loss": "cross_entropy",
    "record": {"every": 100, "steps": [], "optimizer_state": False},
    "out": "runs/run",
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A deep merge: nested dicts merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS, updated by the YAML file at ``path``, updated by ``overrides``."""
    config = DEFAULTS
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ZeroptimError(f"config file '{p}' cannot be read ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise ZeroptimError(f"config file '{p}' is not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ZeroptimError(f"config file '{p}' must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise ZeroptimError(f"config file '{p}': unknown setting '{unknown[0]}' (known: {', '.join(DEFAULTS)})")
        config = merge(config, loaded)
    return merge(config, overrides or {})


def fitted_model_spec(spec: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The model spec with sizes that follow from the data filled in, unless the config set them."""
    name = spec.get("name")
    if name not in REGISTRY:
        raise ConfigError(f"model '{name}' is not one of {', '.join(REGISTRY)}")
    implied: dict[str, Any] = {}
    if "num_classes" in info:
        implied["num_classes"] = info["num_classes"]
    if name == "mlp" and "in_channels" in info:
        implied["in_features"] = info["in_channels"] * info["image_size"] ** 2
    if name in ("cnn", "resnet18") and "in_channels" in info:
        implied["in_channels"] = info["in_channels"]
    if name == "char_transformer":
        implied = {"vocab_size": info.get("vocab_size"), "block_size": info.get("block_size")}
    if name != "char_transformer" and "vocab_size" in info:
        raise ConfigError(f"model '{name}' does not take text; use char_transformer with the text dataset")
    return {"name": name, "kwargs": {**implied, **(spec.get("kwargs") or {})}}


def train(config: dict[str, Any], on_step: Callable[[int, float], None] | None = None,
          overwrite: bool = False) -> Path:
    """Train as ``config`` says, recording the chosen steps; returns the run folder.

    The run folder must be new or empty; ``overwrite`` replaces the run recorded there (its files only).
    """
    out = Path(config["out"])
    if not overwrite and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ZeroptimError(f"run folder '{out}' is not empty; choose a new folder, or overwrite its run "
                            "(zeroptim train --overwrite)")
    device = resolve_device(str(config["device"]))
    if config["dtype"] not in DTYPES:
        raise ConfigError(f"dtype '{config['dtype']}' is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[config["dtype"]]
    torch.manual_seed(int(config["seed"]))
    data = load_dataset(config["dataset"])
    spec = fitted_model_spec(config["model"], data.info)
    model = build_model(spec).to(device=device, dtype=dtype)
    optimizer = build_optimizer(model.parameters(), config["optimizer"])
    loss = resolve_loss(config["loss"])
    record = config["record"]
    recorder = Recorder(config["out"], model, optimizer, every=record.get("every"), steps=record.get("steps") or (),
                        model_spec=spec, loss=loss.name, save_optimizer_state=bool(record.get("optimizer_state")),
                        extra={"config": {**config, "model": spec}}, overwrite=overwrite)
    try:
        generator = torch.Generator().manual_seed(int(config["seed"]))
        model.train()
        for step in range(int(config["steps"])):
            x, y = data.batch(int(config["batch_size"]), generator)
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
            y = y.to(device)
            value = loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            with recorder.step(step, x, y):
                optimizer.step()
            if on_step is not None:
                on_step(step, float(value.detach()))
    finally:
        recorder.close()
    return recorder.folder
