"""The import graph of the package follows docs/architecture.md: no circle, and no arrow from a lower
layer up to a higher one (nor sideways between two packages of one layer)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "zeroptim_cli"

#: The layers of docs/architecture.md, bottom first; a module may import its own package and lower layers.
LAYERS: dict[str, int] = {
    "_version": 0, "errors": 0,
    "vectors": 1, "runtime": 1, "allocator": 1,
    "io": 2,
    "models": 3, "distributed": 3, "optim": 3,
    "derivatives": 4,
    "analysis": 5,
    "report": 6, "training": 6,
    "cli": 7, "integrations": 7,
    "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The zeroptim_cli modules that ``name`` imports, at any depth of its code (lazy imports count)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            found |= submodules
            if len(submodules) < len(node.names):  # names from the package's __init__, not only submodules
                found.add(base)
    return {m for m in found if m in MODULES and m != name}


def package_of(name: str) -> str:
    return name.split(".")[1]


def test_every_package_has_a_layer() -> None:
    assert {package_of(m) for m in MODULES if m != "zeroptim_cli"} <= set(LAYERS)


def violations(name: str, targets: set[str]) -> list[str]:
    """The imports of ``name`` that go to the package root, up a layer, or sideways to another package."""
    out = []
    for target in sorted(targets):
        if target == "zeroptim_cli":
            out.append(f"{name} imports the package root (the public API is for users)")
        elif package_of(target) != package_of(name) and LAYERS[package_of(target)] >= LAYERS[package_of(name)]:
            out.append(f"{name} (layer {LAYERS[package_of(name)]}) imports {target} (layer {LAYERS[package_of(target)]})")
    return out


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "zeroptim_cli"))
def test_no_import_goes_up_or_sideways(name: str) -> None:
    assert violations(name, imports_of(name)) == []


def test_no_import_circle() -> None:
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " → ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_checker_can_fail() -> None:
    """The graph builder finds lazy and package-level imports, and an upward or sideways one is flagged."""
    assert "zeroptim_cli.report.plots" in imports_of("zeroptim_cli.cli.plot")  # inside a function
    assert "zeroptim_cli.distributed" in imports_of("zeroptim_cli.derivatives.objective")  # from pkg import mod
    assert "zeroptim_cli.derivatives" in imports_of("zeroptim_cli.analysis.pair")
    assert violations("zeroptim_cli.io.checkpoint", {"zeroptim_cli.analysis.pair"})
    assert violations("zeroptim_cli.training.loop", {"zeroptim_cli.report.tables"})
    assert violations("zeroptim_cli.io.checkpoint", {"zeroptim_cli"})
    assert not violations("zeroptim_cli.analysis.pair", {"zeroptim_cli.derivatives.objective"})


DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def doc_name(path: Path) -> str:
    """How docs/architecture.md names a module: its path under zeroptim_cli/ (``io/outputs.py``), a package by
    its folder (``io/``), the package root as ``zeroptim_cli/__init__.py``."""
    rel = path.relative_to(ROOT)
    if rel.name != "__init__.py":
        return rel.as_posix()
    return "zeroptim_cli/__init__.py" if rel.parent == Path(".") else rel.parent.as_posix() + "/"


def unnamed_modules(doc: str) -> list[str]:
    """The modules of the package that ``doc`` does not name (in backticks, as ``doc_name`` spells them)."""
    return sorted(n for n in (doc_name(p) for p in MODULES.values()) if f"`{n}`" not in doc)


def test_every_module_is_named_in_the_architecture_doc() -> None:
    assert unnamed_modules(DOC.read_text(encoding="utf-8")) == []


def test_the_naming_check_can_fail() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert unnamed_modules(doc.replace("`io/outputs.py`", "outputs.py")) == ["io/outputs.py"]
    assert "derivatives/taylor/rules/" in unnamed_modules(doc.replace("`derivatives/taylor/rules/`", "rules"))


def test_the_doc_names_every_user_of_distributed() -> None:
    """The distributed.py paragraph lists each module that imports it."""
    doc = DOC.read_text(encoding="utf-8")
    paragraph = doc[doc.index("- **`distributed.py`**"):].split("\n- ")[0]
    users = sorted(doc_name(MODULES[m]) for m in MODULES if "zeroptim_cli.distributed" in imports_of(m))
    assert len(users) >= 3
    assert [u for u in users if f"`{u}`" not in paragraph] == []


def test_every_taylor_rule_has_a_formula_docstring() -> None:
    """Each registered Taylor rule (or, for a rule a factory makes, the factory) says what it computes."""
    import sys

    from zeroptim_cli.derivatives.taylor import engine  # noqa: F401  (fills the rule table)
    from zeroptim_cli.derivatives.taylor._core import RULES

    def documented(fn) -> str:
        if "<locals>" in fn.__qualname__:
            fn = getattr(sys.modules[fn.__module__], fn.__qualname__.split(".<locals>")[0])
        return (fn.__doc__ or "").strip()

    rules = {rule for rule in RULES.values()}
    assert len(rules) > 50
    assert [f"{r.__module__}.{r.__qualname__}" for r in rules if not documented(r)] == []
