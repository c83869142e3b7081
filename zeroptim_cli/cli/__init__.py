"""The ``zeroptim`` command line: one thin module per command over the library; ``app`` holds the
group and the entry point ``main``."""

from zeroptim_cli.cli.app import cli, main

__all__ = ["cli", "main"]
