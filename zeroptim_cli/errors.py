"""Errors the library raises for bad input; the CLI turns each into one ``error:`` line and exit 1."""

from __future__ import annotations


class ZeroptimError(Exception):
    """Bad input or data: a file, a model, a batch. The message names the culprit."""


class ConfigError(ZeroptimError):
    """Bad usage: a flag's value, a malformed spec, or a required input given nowhere (exit 2)."""


class Interrupted(BaseException):
    """SIGINT, raised as an exception (a ``BaseException``, as ``KeyboardInterrupt``, so that no ``except
    Exception`` swallows it) so that every open write and lock is cleaned up on the way out. ``kept`` says
    what the interrupted command kept; the CLI prints it with exit 130."""

    kept = "nothing half-written is left (every output is written whole or not at all)"
