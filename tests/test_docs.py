"""The recipes of README.md and docs/*.md run as written, in the order written, on a fresh copy of the
repository: every ```bash block of a page, one page per fresh folder, scaled down so that the whole test
takes seconds (``scaled``: fewer training steps, the recorded steps the pages name kept).

A block that cannot run as it stands (a synopsis of placeholders, the test command itself) says so on the
line before it: ``<!-- docs-test: skip (why) -->``. The pages' commands are run in this process through
``zeroptim_cli.cli.main`` by a small reading of the shell they are written in: ``&&``, ``\\`` line
continuations, comments, quotes, ``NAME=value`` and ``$NAME``; any other command or construct fails the
test, so that the pages keep to what a reader can paste.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from zeroptim_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What a fresh clone holds that the recipes read (and the figures they redraw).
CLONED = ("configs", "sample_ckpts", "docs")

SKIP = re.compile(r"^<!-- docs-test: skip \((.+)\) -->$")
FENCE = re.compile(r"^```(\S*)")

#: Set-up steps a page shows before its commands: done already where the tests run.
DONE = (("python3", "-m", "venv"), (".",), ("pip", "install"))

#: ``zeroptim train`` of a page, scaled: (the config it trains, the flags appended), else TRAIN_DEFAULT.
#: The SGD-against-Adam runs record step 0 only, and the steps the pages name in those runs become it
#: (STEP_SCALE): one pair per run.
CHAR_SCALE = ["--steps", "2", "--record-every", "1000"]
TRAIN_SCALE = {"configs/char_sgd.yaml": CHAR_SCALE, "configs/char_adam.yaml": CHAR_SCALE}
TRAIN_DEFAULT = ["--steps", "2", "--record-every", "1"]
STEP_SCALE = [(re.compile(r"^(runs/char_\w+/(?:ckpt|batch))_000(?:100|250)\b"), r"\1_000000"),
              (re.compile(r"^(runs/char_\w+/ckpt)_000(?:101|251)\b"), r"\1_000001")]
#: Curvature estimates of many HVPs, scaled.
FLAG_SCALE = {"--lanczos": "4", "--hutchinson": "4"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    text: str
    skip: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's ```bash blocks, each with the reason it is skipped (the marker line before its fence)."""
    out, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "bash":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.match(before.strip())
            out.append(Block(page, i + 1, "\n".join(lines[i + 1:end]), skip.group(1) if skip else None))
        i = end + 1
    return out


def commands(text: str, variables: dict[str, str]) -> list[list[str]]:
    """The argv of each command of a block, in order; ``NAME=value`` lines set ``variables``."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], line)
        tokens = shlex.split(line, comments=True)
        if len(tokens) == 1 and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        argv: list[str] = []
        for token in [*tokens, "&&"] if tokens else []:
            if token != "&&":
                assert not re.fullmatch(r"[|;<>&]+|\d?>>?", token), f"shell construct {token!r} in: {line}"
                argv.append(token)
            elif argv:
                out.append(argv)
                argv = []
    return out


def scaled(argv: list[str]) -> list[str] | None:
    """The command as the test runs it, or None for a set-up step already done."""
    if any(tuple(argv[:len(done)]) == done for done in DONE):
        return None
    assert argv[0] == "zeroptim", f"not a zeroptim command: {shlex.join(argv)}"
    argv = [argv[0], *(FLAG_SCALE.get(flag, a) for flag, a in zip(argv, argv[1:]))]
    for pattern, step in STEP_SCALE:
        argv = [pattern.sub(step, a) for a in argv]
    if argv[1] == "train":
        argv += TRAIN_SCALE.get(argv[2], TRAIN_DEFAULT)
    return argv[1:]


def fresh_clone(folder: Path) -> Path:
    for name in CLONED:
        shutil.copytree(ROOT / name, folder / name)
    return folder


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.docs
@pytest.mark.parametrize("page", [p for p in PAGES if any(b.skip is None for b in blocks(p))], ids=page_id)
def test_recipes_run_in_order_on_a_fresh_clone(page: Path, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(fresh_clone(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    variables: dict[str, str] = {}
    ran = 0
    for block in blocks(page):
        if block.skip is not None:
            continue
        for argv in commands(block.text, variables):
            args = scaled(argv)
            if args is None:
                continue
            status = main(args)
            out, err = capsys.readouterr()
            assert status == 0, f"{block}: `{shlex.join(argv)}` exited {status}\n{err}"
            ran += 1
    assert ran


def test_every_skip_marker_stands_before_a_bash_block_and_says_why() -> None:
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("<!-- docs-test"):
                assert SKIP.match(line.strip()), f"{page_id(page)}:{i + 1}: {line}"
                assert lines[i + 1].startswith("```bash"), f"{page_id(page)}:{i + 1}: no ```bash block after it"


def test_the_scaling_tables_name_what_the_pages_run() -> None:
    """No entry of the tables outlives the recipe it scales."""
    runnable = []
    for page in PAGES:
        variables: dict[str, str] = {}
        runnable += [a for b in blocks(page) if b.skip is None for a in commands(b.text, variables)]
    for config in TRAIN_SCALE:
        assert ["zeroptim", "train", config] in [a[:3] for a in runnable], config
    for flag in FLAG_SCALE:
        assert any(flag in a for a in runnable), flag
    for pattern, _ in STEP_SCALE:
        assert any(pattern.search(token) for a in runnable for token in a), pattern.pattern


def test_the_reading_of_the_shell() -> None:
    variables: dict[str, str] = {}
    text = "D=a,b\nzeroptim x 'runs/*' \\\n  --d $D && zeroptim y   # a comment\n"
    assert commands(text, variables) == [["zeroptim", "x", "runs/*", "--d", "a,b"], ["zeroptim", "y"]]
    with pytest.raises(AssertionError, match="shell construct"):
        commands("zeroptim x | cat", {})
    assert scaled(["pip", "install", "-e", "."]) is None
    assert scaled(["zeroptim", "analyze", "a", "--lanczos", "30"]) == ["analyze", "a", "--lanczos", "4"]
    assert scaled(["zeroptim", "inspect", "runs/char_sgd/ckpt_000250.safetensors", "runs/char_sgd/ckpt_000251.st"]) \
        == ["inspect", "runs/char_sgd/ckpt_000000.safetensors", "runs/char_sgd/ckpt_000001.st"]


def test_the_recorders_documented_signature_is_the_codes() -> None:
    """docs/recording.md shows ``Recorder(...)`` with its defaults; they are the code's, every argument."""
    import ast
    import inspect

    from zeroptim_cli import Recorder

    page = (ROOT / "docs" / "recording.md").read_text()
    shown = re.search(r"^Recorder\((.*?)\)\n```", page, re.S | re.M)
    assert shown, "docs/recording.md shows no Recorder(...) signature"
    call = ast.parse(f"f({shown.group(1).replace('*,', '')})").body[0].value  # type: ignore[attr-defined]
    documented = {**{a.id: inspect.Parameter.empty for a in call.args},
                  **{k.arg: ast.literal_eval(k.value) for k in call.keywords}}
    code = {n: p.default for n, p in inspect.signature(Recorder).parameters.items()}
    assert documented == code
