"""Resolving ``path/to/file.py:function`` and ``package.module:function`` specs to callables, and the
trust rule for specs that come from a file rather than from the user: a checkpoint is data, never code."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeroptim_cli.errors import ConfigError, ZeroptimError


def load_callable(spec: str, what: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import the function a spec names; ``what`` (e.g. "--model") names the culprit in errors.

    A malformed spec is a usage error (ConfigError); a module, file or function that is not there is bad
    input (ZeroptimError).

    A relative file path is looked up in the working directory first, then in ``base_dir``.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr or (not _is_file(target) and not all(target.split("."))):
        raise ConfigError(f"{what} '{spec}' must look like 'path/to/file.py:function' or 'package.module:function'")
    if _is_file(target):
        module = _import_file(Path(target), spec, what, base_dir)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ZeroptimError(f"{what} '{spec}': cannot import module '{target}' ({exc}); "
                                f"{_module_hint(target, attr)}") from exc
        except Exception as exc:  # ImportError, or whatever the module raised while it ran
            raise ZeroptimError(f"{what} '{spec}': cannot import module '{target}' ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ZeroptimError(f"{what} '{spec}': '{target}' has no attribute '{attr}'")
    if not callable(fn):
        raise ZeroptimError(f"{what} '{spec}': '{attr}' is not callable")
    return fn


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def spec_file(spec: str, base_dir: Path | None = None) -> Path | None:
    """The file a ``path/to/file.py:function`` spec would import (as ``load_callable`` looks it up), None
    for a module spec, a built-in name or a file that is not there."""
    target, sep, _ = spec.rpartition(":")
    return _find_file(Path(target), base_dir) if sep and _is_file(target) else None


def _find_file(path: Path, base_dir: Path | None) -> Path | None:
    candidates = [path] if path.is_absolute() or base_dir is None else [path, base_dir / path]
    return next((c for c in candidates if c.is_file()), None)


def _module_hint(target: str, attr: str) -> str:
    """How to name a module that is not importable: by its file, or by putting its folder on the path."""
    as_file = Path(*target.split(".")).with_suffix(".py")
    return (f"for a file of your own, name it as '{as_file}:{attr}' (relative to the working directory), "
            f"or add its folder to PYTHONPATH")


def _import_file(path: Path, spec: str, what: str, base_dir: Path | None) -> Any:
    found = _find_file(path, base_dir)
    if found is None:
        raise ZeroptimError(f"{what} '{spec}': file '{path}' does not exist")
    resolved = found.resolve()
    name = f"_zeroptim_user_{hashlib.sha1(str(resolved).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ZeroptimError(f"{what} '{spec}': cannot load '{found}' as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ZeroptimError(f"{what} '{spec}': importing '{found}' failed ({type(exc).__name__}: {exc})") from exc
    return module


@dataclass(frozen=True)
class Trust:
    """Which code the user lets run. A spec found in a file's metadata (a model factory, a loss) runs
    only with ``code`` (``--trust-code``), or when the user named the same spec (``--model``, ``--loss``),
    collected in ``named``. Built-in model and loss names are data, not code, and need neither."""

    code: bool = False
    named: frozenset[str] = frozenset()

    def allows(self, spec: str) -> bool:
        return self.code or spec in self.named


def metadata_callable(spec: str, what: str, flag: str, source: Path, trust: Trust,
                      base_dir: Path | None = None) -> Callable[..., Any]:
    """The callable of a spec read from ``source``'s metadata, if ``trust`` allows it; otherwise an error
    that names the spec, the file, and both ways to proceed."""
    if not trust.allows(spec):
        raise ZeroptimError(
            f"'{source}' names the {what} '{spec}' in its metadata, which would run code from it; "
            f"if you trust that code, pass --trust-code, or name it yourself with {flag} {spec}")
    return load_callable(spec, f"{what} of '{source}'", base_dir)
