"""The package version, in one place (the CLI, the Recorder and ``pyproject.toml`` read it)."""

__version__ = "0.1.0"
