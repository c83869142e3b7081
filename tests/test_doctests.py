"""The examples in the docstrings of the main entry points run, and give what they show.

Each module's examples are tiny (a two-weight model, float64, seeded) and print rounded numbers, so they are
stable; they import nothing optional.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

#: the modules whose docstrings hold examples: analyze_pair, taylor2, Objective, Recorder
MODULES = [
    "zeroptim_cli.analysis.pair",
    "zeroptim_cli.derivatives.taylor.engine",
    "zeroptim_cli.derivatives.objective",
    "zeroptim_cli.training.recorder",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_a_wrong_example_fails() -> None:
    """The check above can fail: an example whose output differs is counted as failed."""
    test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "wrong", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1
