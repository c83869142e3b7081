"""Errors the library raises for bad input; the CLI turns each into one ``error:`` line and exit 1."""

from __future__ import annotations


class ZeroptimError(Exception):
    """Bad input or data: a file, a model, a batch. The message names the culprit."""


class ConfigError(ZeroptimError):
    """Bad usage: a flag's value, a malformed spec, or a required input given nowhere (exit 2)."""
