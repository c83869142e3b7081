"""peft LoRA adapters: a folder of ``adapter_config.json`` and ``adapter_model.safetensors``, as peft's
``save_pretrained`` and Trainer's ``checkpoint-N`` of a peft model write it, read as a checkpoint.

An adapter holds only the trained weights; the model is the base model with the adapter on it:

* The base is a Hugging Face folder (``io.hf``): the one passed as ``base`` (``--base DIR``), else the one
  the adapter config records (``base_model_name_or_path``) when that is a local folder. Its name is data:
  a hub id is never downloaded (without ``--base`` it is an error saying to pass one), and no code that
  came with either folder runs.
* The adapter config is read as JSON and built by peft's own config class (``LoraConfig``); LoRA is the
  adapter type read (others are refused by name). ``init_lora_weights`` is set to False (the weights are the
  adapter's, and some initialisations rewrite the base weights), and a config asking peft to import a
  module (``megatron_config``) is refused.
* The adapter weights come only from ``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is
  refused) and are put in place by peft's ``set_peft_model_state_dict``; an adapter weight the model lacks,
  or one the file lacks, is an error.

The checkpoint is then the whole state of the peft model (``state_dict()``, peft's names: the base's
weights under ``base_layer``, the adapter's under ``lora_A.default`` …) and its model spec is the base's
``hf_config`` with the adapter's config under ``peft``, so that the model is rebuilt from the metadata as
any other (``models.hf``). The base's weights are frozen in that model: the analysis is over the adapter.

peft is an optional extra (``pip install -e ".[peft]"``), imported only when an adapter is met.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import LastRead, leads_out, read_json, read_safetensors
from zeroptim_cli.io.hf import folder_step, is_hf_folder, load_hf_model, quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: An adapter saved as a pickle (``safe_serialization=False``): never read.
PICKLED_ADAPTER = "adapter_model.bin"
INSTALL = 'pip install -e ".[peft]"'
#: The model spec key (beside ``hf_config``) holding the adapter's peft config as a JSON object.
PEFT_KEY = "peft"
#: The adapter types read.
ADAPTER_TYPES = ("LORA",)
#: Config keys that say where and how an adapter was saved, not what it is: left out of the model spec.
_VOLATILE = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with ``adapter_config.json`` and adapter weights (safetensors, or a
    pickle, which ``read_adapter_weights`` refuses)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and any(
        (path / n).is_file() for n in (ADAPTER_WEIGHTS, PICKLED_ADAPTER))


def peft_module(what: str) -> ModuleType:
    """The peft package, or an error saying that ``what`` needs the ``peft`` extra."""
    try:
        import peft
    except ImportError as exc:
        raise ZeroptimError(f"{what} needs peft: {INSTALL}") from exc
    return peft


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def comparable_adapter(config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config as the model spec holds it: without the keys that say where it was saved
    (``_VOLATILE``), as JSON (sets as sorted lists, enums as their values), ``target_modules`` sorted, so
    that a live model's config and one read from a folder compare by value."""
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    plain = json.loads(json.dumps(kept, default=_jsonable))
    if isinstance(plain.get("target_modules"), list):
        plain["target_modules"] = sorted(plain["target_modules"], key=str)
    return plain  # type: ignore[no-any-return]


def adapter_spec(model: nn.Module) -> dict[str, Any] | None:
    """The ``peft`` spec of a live peft model (its one adapter's config, ``comparable_adapter``), None for
    a model that is not a peft model. A model with several adapters is refused (which one trained?)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "get_base_model"):
        return None
    if len(configs) != 1:
        raise ZeroptimError(f"the peft model has {len(configs)} adapters ({', '.join(sorted(configs))}); "
                            "zeroptim reads a model with one")
    return comparable_adapter(next(iter(configs.values())).to_dict())


def peft_config(spec: dict[str, Any], source: str) -> Any:
    """peft's config object for the adapter ``spec`` (an adapter_config as a JSON object), built so that
    nothing is initialised or imported: LoRA only, ``init_lora_weights=False``, no ``megatron_config``."""
    if not isinstance(spec, dict):
        raise ZeroptimError(f"{source} must be a JSON object (a peft adapter config)")
    kind = spec.get("peft_type")
    if kind not in ADAPTER_TYPES:
        raise ZeroptimError(f"{source} is a peft adapter of type {json.dumps(kind)}; zeroptim reads "
                            f"{', '.join(ADAPTER_TYPES)} adapters")
    if spec.get("megatron_config"):
        raise ZeroptimError(f"{source} sets 'megatron_config', which makes peft import a module; zeroptim never "
                            "imports code named in a checkpoint")
    peft = peft_module(source)
    kwargs = {k: v for k, v in spec.items() if k not in _VOLATILE}
    kwargs.update(init_lora_weights=False, inference_mode=False)
    try:
        return peft.PeftConfig.from_peft_type(**kwargs)
    except Exception as exc:  # peft validates its fields with ValueError, TypeError…
        raise ZeroptimError(f"{source} is not a valid peft {kind} config ({type(exc).__name__}: {exc})") from exc


def apply_adapter(model: nn.Module, spec: dict[str, Any], source: str) -> nn.Module:
    """``model`` (a transformers model) with the adapter of ``spec`` on it, as peft's ``get_peft_model``
    builds it: the base's parameters frozen, the adapter's trainable (weights still to be loaded)."""
    config = peft_config(spec, source)
    peft = peft_module(source)
    try:
        with quiet_transformers():
            return peft.get_peft_model(model, config)  # type: ignore[no-any-return]
    except Exception as exc:  # a target module the model lacks, …
        raise ZeroptimError(f"{source} does not fit the base model ({type(exc).__name__}: {exc})") from exc


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json`` as a JSON object."""
    path = folder / ADAPTER_CONFIG
    config = read_json(path)
    if not isinstance(config, dict):
        raise ZeroptimError(f"'{path}' is not a JSON object")
    return config


def base_folder(folder: Path, config: dict[str, Any], base: Path | None) -> Path:
    """The base model's folder for the adapter ``folder``: ``base`` when given, else the local folder the
    adapter config names (an absolute path, or one relative to the working directory, as peft recorded it);
    a name that is no local model folder (a hub id) is an error asking for ``--base``."""
    if base is not None:
        if not is_hf_folder(base):
            raise ZeroptimError(f"--base '{base}' is not a Hugging Face model folder (config.json with "
                                "model.safetensors or its index)")
        return base
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and is_hf_folder(Path(named)):
        return Path(named)
    relative = isinstance(named, str) and bool(named) and not Path(named).is_absolute()
    where = f" in the working directory '{Path.cwd()}' (a relative path is read from there)" if relative else ""
    raise ZeroptimError(f"adapter '{folder}' names its base model {json.dumps(named)}, which is not a local model "
                        f"folder{where}; pass --base DIR, the base model's Hugging Face folder (zeroptim downloads "
                        "nothing)")


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors from ``adapter_model.safetensors`` inside ``folder`` (a link out of it, or
    weights only as a pickle, refused before anything is opened)."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ZeroptimError(f"adapter folder '{folder}' holds its weights only as a pickle ('{PICKLED_ADAPTER}'): "
                            "pickles are never read (unpickling can run code); if you trust the folder, save it "
                            "again with peft: save_pretrained(..., safe_serialization=True)")
    if leads_out(folder, ADAPTER_WEIGHTS) is not None:
        raise ZeroptimError(f"'{path}' leads out of the adapter folder; weights are read only from files inside it")
    tensors, _ = read_safetensors(path, "adapter")
    return tensors


def load_adapter(model: nn.Module, folder: Path, spec: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The peft model of the base ``model`` (weights loaded) with the adapter of ``folder`` on it (config
    ``spec``, ``weights`` as ``read_adapter_weights`` gives them), put in place by peft's
    ``set_peft_model_state_dict``."""
    source = f"'{folder / ADAPTER_CONFIG}'"
    peft_model = apply_adapter(model, spec, source)
    peft = peft_module(source)
    try:
        with quiet_transformers():
            info = peft.set_peft_model_state_dict(peft_model, weights)
    except Exception as exc:  # shapes that do not fit
        raise ZeroptimError(f"adapter '{folder}' does not fit its base model ({type(exc).__name__}: {exc})") from exc
    adapter_names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    missing = sorted(n for n in info.missing_keys if n in adapter_names)
    if info.unexpected_keys or missing:
        name, what = (sorted(info.unexpected_keys)[0], "which the model does not have") if info.unexpected_keys \
            else (missing[0], "which the model has but the adapter lacks")
        raise ZeroptimError(f"adapter '{folder / ADAPTER_WEIGHTS}': '{name}', {what}")
    return peft_model


def read_adapter_folder(folder: Path, base: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the peft model's state dict, zeroptim metadata) for the adapter ``folder`` on the base model of
    ``base_folder``: the metadata's ``model`` is the base's ``hf_config`` with the adapter's config under
    ``peft``, its ``step`` as ``io.hf.folder_step`` says."""
    config = read_adapter_config(folder)
    spec = comparable_adapter(config)
    peft_config(spec, f"'{folder / ADAPTER_CONFIG}'")  # a config that cannot be read fails before the base loads
    weights = read_adapter_weights(folder)
    home = base_folder(folder, config, base)
    model, meta = load_hf_model(home)
    peft_model = load_adapter(model, folder, spec, weights)
    frozen = {id(p) for p in peft_model.parameters() if not p.requires_grad}
    tensors = peft_model.state_dict(keep_vars=True)
    shared = _shared_base(home, {n: t for n, t in tensors.items() if id(t) in frozen})
    return {n: shared.get(n, t.detach()) for n, t in tensors.items()}, \
        {"model": {**meta["model"], PEFT_KEY: spec}, "step": folder_step(folder)}


#: The frozen base weights of the last adapter read, by its base folder's identity (``_folder_id``): the
#: adapters of one run share those tensors (held once, Δ of them zero by construction).
_BASES: LastRead[dict[str, torch.Tensor]] = LastRead()


def _folder_id(folder: Path) -> str:
    """The base folder's resolved path and the name, size and modification time of each file in it."""
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
    return json.dumps([os.path.realpath(folder), files])


def _shared_base(home: Path, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``frozen`` (name → the base's weight, as just loaded from ``home``), or the same tensors of the last
    adapter read on the same, unchanged base folder with the same names, which are then shared."""
    def same(cached: dict[str, torch.Tensor]) -> bool:
        return cached.keys() == frozen.keys() and all(
            cached[n].shape == t.shape and cached[n].dtype == t.dtype for n, t in frozen.items())

    return _BASES.get(_folder_id(home), lambda: {n: t.detach() for n, t in frozen.items()}, same)
