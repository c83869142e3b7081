"""Hugging Face checkpoint folders: what ``save_pretrained`` and Trainer's ``checkpoint-N`` write.

A folder is one when it holds ``config.json`` and the weights as safetensors: ``model.safetensors``, or
``model.safetensors.index.json`` and the shards it names. Reading one:

* The model class is the one ``config.json`` names in ``architectures``, taken from the transformers
  package itself (``getattr(transformers, name)``); a config naming a class transformers does not have
  is an error naming the file. ``trust_remote_code`` is never set and ``auto_map`` never followed, so no
  code that came with the folder runs.
* The weights are read by transformers' own ``from_pretrained`` (``use_safetensors=True``,
  ``local_files_only=True``): shards merged, tied weights re-tied, legacy key names renamed to the
  model's (a ViT saved by transformers 5 stores 32 of its 40 tensors under older names) exactly as
  transformers reads them; writing our own key mapping would copy transformers' private conversion
  tables and drift from them. The tensors are then taken from ``state_dict()``, under the names
  ``named_parameters()`` uses. A weight the model has but the folder lacks is an error (transformers
  would initialise it at random and only warn).
* Weights come only from ``.safetensors`` files inside the folder (``check_weights``, before any is
  opened): an index naming another file (``pytorch_model.bin``) or a path leading out of the folder
  (``..``, a symlink) is refused, and so is a folder whose weights are only a pickle. Pickle files beside
  them (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``,
  ``pytorch_model.bin``) are never opened.
* The step is ``trainer_state.json``'s ``global_step``, else N of a folder named ``checkpoint-N``; the
  learning rate (metadata ``learning_rate``) the last ``learning_rate`` its ``log_history`` logged at a step up
  to that one (``folder_learning_rate``).

transformers is an optional extra (``pip install -e ".[hf]"`` in a clone) imported only here and only when a
folder or an ``hf_config`` model spec is met.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import leads_out, read_header, read_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: Weights saved as pickles (``save_pretrained(..., safe_serialization=False)``): never read.
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONVERT = ("pickles are never read (unpickling can run code); if you trust the folder, convert it with "
           "transformers: save_pretrained(..., safe_serialization=True)")
TRAINER_STATE = "trainer_state.json"
INSTALL = 'pip install -e ".[hf]"'
#: The model spec key (checkpoint metadata ``model``) holding a transformers config as a JSON object.
SPEC_KEY = "hf_config"
#: Config keys that say how a config was written, not which model it is: left out when two are compared.
_VOLATILE = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
_CHECKPOINT_N = re.compile(r"^checkpoint-(\d+)$")
#: Config keys that count repeated blocks (``n_layer``, ``num_hidden_layers``, ``decoder_layers``, …).
_BLOCK_COUNT = re.compile(r"(^|_)layers?$")


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with ``config.json`` and weights: safetensors (flat or sharded), or a
    pickle (which ``check_weights`` refuses with a word on converting it)."""
    return path.is_dir() and (path / CONFIG).is_file() and any((path / n).is_file() for n in (WEIGHTS, INDEX, *PICKLED))


def check_weights(folder: Path) -> dict[str, Path]:
    """Refuse, before any weight file is opened, a folder whose weights are not all ``.safetensors`` files
    inside it: an index naming another file or a path leading out of the folder (after symlinks), a
    ``model.safetensors`` that is a link out of it, weights that are only a pickle. Returns the index's map,
    tensor name → the shard that holds it (empty for a flat ``model.safetensors``)."""
    def inside(name: str, source: Path) -> None:
        out = leads_out(folder, name)
        if out is not None:
            raise ZeroptimError(f"'{source}' names weights '{name}' outside the checkpoint folder (at '{out}'); "
                                "weights are read only from files inside it")

    if not (folder / WEIGHTS).is_file() and not (folder / INDEX).is_file():
        pickled = next(n for n in PICKLED if (folder / n).is_file())
        raise ZeroptimError(f"checkpoint folder '{folder}' holds its weights only as a pickle ('{pickled}'): {CONVERT}")
    if (folder / WEIGHTS).is_file():
        inside(WEIGHTS, folder)
        return {}
    index = read_json(folder / INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ZeroptimError(f"'{folder / INDEX}' has no 'weight_map' object of file names")
    for name in sorted(set(weight_map.values())):
        if not name.endswith(".safetensors"):
            raise ZeroptimError(f"'{folder / INDEX}' maps weights to '{name}', not a .safetensors file: {CONVERT}")
        inside(name, folder / INDEX)
    return {name: folder / file for name, file in weight_map.items()}


def require_hf_folder(path: Path) -> None:
    """An error unless the directory ``path`` is a Hugging Face checkpoint folder (``is_hf_folder``)."""
    if not is_hf_folder(path):
        raise ZeroptimError(f"checkpoint '{path}' is a directory, but not a Hugging Face checkpoint folder "
                            f"('{CONFIG}' with '{WEIGHTS}' or '{INDEX}')")


def transformers_module(what: str) -> ModuleType:
    """The transformers package, or an error saying that ``what`` needs the ``hf`` extra."""
    try:
        import transformers
    except ImportError as exc:
        raise ZeroptimError(f"{what} needs transformers: {INSTALL}") from exc
    return transformers


#: transformers patches global state while it loads (``from_pretrained`` replaces
#: ``PreTrainedModel.tie_weights`` by a no-op), so a model built in one thread while another loads comes
#: out untied: seen in a sweep, whose loader thread reads the next folders while the current pair builds
#: its model (GPT-2's lm_head then counted apart from the embedding: a wrong ‖Δ‖ and ‖g‖, with no error).
_TRANSFORMERS = threading.RLock()
#: held around every model build too (``models.build_model``): a user's factory may build a transformers model
TRANSFORMERS_LOCK = _TRANSFORMERS


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """One transformers call at a time in this process (``_TRANSFORMERS``), with no progress bars, no
    log messages and no Python warnings from transformers (stderr stays ours: an error is our one line;
    the settings are restored after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging = transformers_module("a Hugging Face model").utils.logging
    with _TRANSFORMERS, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def model_class(config: dict[str, Any], source: str) -> type:
    """The transformers class ``config["architectures"][0]`` names (``source`` names the config in errors, as
    it is written there: a file's name in quotes, or words such as "checkpoint metadata 'hf_config'")."""
    transformers = transformers_module(f"Hugging Face model '{source}'")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise ZeroptimError(f"{source} names no model class in 'architectures'")
    name = architectures[0]
    cls = getattr(transformers, name, None)
    if name.startswith("PeftModel"):  # peft's wrapper, as an earlier ZeroptimCallback recorded a peft model
        raise ZeroptimError(f"{source} names model class '{name}', peft's wrapper, not a transformers model: "
                            "the base model and its adapter are not recorded apart; record the run again "
                            "(ZeroptimCallback records a peft model's base config and its adapter config)")
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ZeroptimError(f"{source} names model class '{name}', which transformers {transformers.__version__} "
                            "does not have (zeroptim never runs code that comes with a model)")
    if name.endswith("PreTrainedModel"):  # transformers' abstract bases (PreTrainedModel, GPT2PreTrainedModel)
        raise ZeroptimError(f"{source} names model class '{name}', an abstract base that no model is built from; "
                            "'architectures' names the model's own class (e.g. GPT2LMHeadModel)")
    return cls


def check_block_counts(config: Any, tensors: int, source: str) -> None:
    """Refuse a config that asks for more repeated blocks than its weights hold tensors: every block of a
    model holds at least one tensor, so ``n_layer`` = 10⁹ beside a 15-tensor file is not a config of these
    weights, and building it (even on the meta device) would take hours and all memory first. Nested
    configs (``text_config``, an encoder's and a decoder's) are checked too; a ``max_…`` key (Qwen2's
    ``max_window_layers``) is a threshold, not a count. ``source`` names the config in the message. A count the
    config leaves to its class's default is ``check_model_size``'s to judge."""
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        if isinstance(value, dict):
            check_block_counts(value, tensors, source)
        elif (isinstance(value, int) and not isinstance(value, bool) and _BLOCK_COUNT.search(key)
              and not key.startswith("max_") and value > tensors):
            raise ZeroptimError(f"{source} asks for {value} blocks ('{key}'), more than the {tensors} tensors its "
                                "weights hold: it is not the config of these weights")


def check_spec_blocks(meta: dict[str, Any], tensors: int, source: Path) -> None:
    """``check_block_counts`` for a checkpoint file whose metadata names a transformers config."""
    spec = (meta.get("model") or {}).get(SPEC_KEY)
    check_block_counts(spec, tensors, f"checkpoint '{source}': metadata '{SPEC_KEY}'")


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys that only say how it was written (``_VOLATILE``, private ``_…``), as JSON
    reads it back (``id2label``'s int keys as strings, tuples as lists), so that a config taken from a live
    model and one read from a checkpoint's JSON metadata compare by value.

    Pass a full ``PretrainedConfig.to_dict()``: ``config.json`` holds only what differs from the defaults,
    so a folder's config and a live model's compare equal only once both are complete.
    """
    kept = {k: v for k, v in config.items() if k not in _VOLATILE and not k.startswith("_")}
    return json.loads(json.dumps(kept, default=str))  # type: ignore[no-any-return]


def config_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key (sorted) where two configs differ, with both values; None when they agree."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"'{key}' is {json.dumps(a.get(key))} against {json.dumps(b.get(key))}"
    return None


def _trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.json`` of the folder as a JSON object ({} when there is none or it is not an object)."""
    state = folder / TRAINER_STATE
    content = read_json(state) if state.is_file() else None
    return content if isinstance(content, dict) else {}


def folder_step(folder: Path, state: dict[str, Any] | None = None) -> int | None:
    """``trainer_state.json``'s ``global_step`` (``state``: that file's content, when already read), else N of
    ``checkpoint-N``, else None."""
    step = (_trainer_state(folder) if state is None else state).get("global_step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    match = _CHECKPOINT_N.match(folder.name)
    return int(match.group(1)) if match else None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def folder_learning_rate(state: dict[str, Any], step: int | None) -> float | None:
    """The ``learning_rate`` of the latest ``log_history`` entry of ``trainer_state.json`` (its content
    ``state``) logged at a step ≤ ``step`` (Trainer logs it every ``logging_steps``; transformers 5 logs the
    rate of the optimizer step just taken), else None."""
    history = state.get("log_history")
    logged = [(e["step"], e["learning_rate"]) for e in history if isinstance(e, dict) and _number(e.get("step"))
              and _number(e.get("learning_rate")) and (step is None or e["step"] <= step)] \
        if isinstance(history, list) else []
    return float(max(logged, key=lambda e: e[0])[1]) if logged else None


def folder_metadata(folder: Path, files: dict[str, Path] | None = None) -> tuple[type, dict[str, Any]]:
    """(the transformers class ``config.json`` names, zeroptim metadata for the folder): the metadata's
    ``model`` is ``{"hf_config": config}`` (complete and comparable), ``step`` as ``folder_step`` says,
    ``learning_rate`` as ``folder_learning_rate`` says. ``files``: what ``check_weights`` gave for the
    folder, when the caller has checked its weights already."""
    config_path = folder / CONFIG
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ZeroptimError(f"'{config_path}' is not a JSON object")
    files = check_weights(folder) if files is None else files
    check_block_counts(config, len(files) or len(read_header(folder / WEIGHTS, "checkpoint")[0]), f"'{config_path}'")
    cls = model_class(config, f"'{config_path}'")
    try:
        with quiet_transformers():
            complete = cls.config_class.from_dict(config).to_dict()
    except Exception as exc:  # transformers validates config fields with its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ZeroptimError(f"'{config_path}' is not a valid {cls.__name__} config ({first})") from exc
    state = _trainer_state(folder)  # read once: its log history grows with the run
    step = folder_step(folder, state)
    return cls, {"model": {SPEC_KEY: comparable_config(complete)}, "step": step,
                 "learning_rate": folder_learning_rate(state, step)}


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the model's state dict as transformers loads the folder, zeroptim metadata for it, as
    ``folder_metadata`` gives it)."""
    model, meta = load_hf_model(folder)
    return {name: t.detach() for name, t in model.state_dict().items()}, meta


#: A config may ask for at most this many times the weights its files hold (plus ``SIZE_SLACK``): a model of a
#: folder holds each of its weights once, tied ones included, so only a config of other weights asks for more.
SIZE_FACTOR = 2
SIZE_SLACK = 2**20


def check_model_size(cls: type, config: dict[str, Any], folder: Path, files: dict[str, Path]) -> None:
    """Refuse a config whose model would hold more than ``SIZE_FACTOR`` times the weights the folder's files hold:
    ``from_pretrained`` allocates the whole model before it compares names and shapes, so a tiny model's
    ``config.json`` with a width of 30000 would take tens of GB first. The model is built on the meta device (no
    memory) to count its weights, the files' from their headers; a config that cannot be built there is left
    to ``from_pretrained`` to report. ``files``: what ``check_weights`` gave for the folder."""
    shards = sorted(set(files.values())) or [folder / WEIGHTS]
    held = sum(math.prod(entry["shape"]) for shard in shards
               for entry in read_header(shard, "checkpoint")[0].values())
    try:
        with quiet_transformers(), torch.device("meta"):
            asked = sum(p.numel() for p in cls(cls.config_class.from_dict(config)).parameters())
    except Exception:  # noqa: BLE001 - from_pretrained reports what is wrong with the config
        return
    if asked > SIZE_FACTOR * held + SIZE_SLACK:
        raise ZeroptimError(f"'{folder / CONFIG}' asks for a {cls.__name__} of {asked:,} weights, its files hold "
                            f"{held:,}: it is not the config of these weights")


def load_hf_model(folder: Path) -> tuple[Any, dict[str, Any]]:
    """(the model as transformers loads the folder, zeroptim metadata for it, as ``folder_metadata`` gives it),
    after ``check_model_size``."""
    files = check_weights(folder)
    cls, meta = folder_metadata(folder, files)
    check_model_size(cls, meta["model"][SPEC_KEY], folder, files)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                              trust_remote_code=False, output_loading_info=True, dtype="auto")
    except Exception as exc:  # transformers raises OSError, ValueError, RuntimeError… for bad folders
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ZeroptimError(f"checkpoint folder '{folder}' cannot be loaded by transformers ({first})") from exc
    for kind in ("missing_keys", "mismatched_keys"):
        if info.get(kind):
            name = sorted(str(k) for k in info[kind])[0]
            raise ZeroptimError(f"checkpoint folder '{folder}': '{name}' is {kind.split('_')[0]} "
                                f"({len(info[kind])} {kind.replace('_', ' ')} in all)")
    return model, meta
