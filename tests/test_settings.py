"""The settings: one object from the command line (or a caller) down to the objective, and the sweep's
settings key (what changes the numbers only, versioned, older rows still resumed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, replace

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import perturbed
from test_exact import tiny_batches, tiny_mlp
from test_sweep import lines, record_run

from zeroptim_cli import Evaluation, analyze_pair, resolve_loss
from zeroptim_cli.analysis import sweep as sweep_module
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.analysis.sweep import find_pairs, legacy_settings_key, settings_key, sweep, sweep_key
from zeroptim_cli.cli.analyze import analyze
from zeroptim_cli.cli.compare import compare
from zeroptim_cli.cli.options import scale_options, settings_options
from zeroptim_cli.cli.sweep import sweep as sweep_command
from zeroptim_cli.derivatives import objective
from zeroptim_cli.errors import ZeroptimError

FIELDS = {f.name for f in fields(Settings)}

#: A value other than the default for every field of Settings, as the command line gives it.
EVERY = dict(model="m.py:build", loss="mse", device="cpu", dtype="float64", method="taylor", chunk_size=7,
             train=True, seed=3, trust_code=True, direction="neg-grad", critical=True, critical_tol=0.1,
             stream=True, max_memory=10**9, base="base-model")
EVERY_ARGS = ["--model", "m.py:build", "--loss", "mse", "--device", "cpu", "--dtype", "float64", "--method",
              "taylor", "--chunk-size", "7", "--train-mode", "--seed", "3", "--trust-code", "--direction", "neg-grad",
              "--critical", "--critical-tol", "0.1", "--stream", "--max-memory", "1GB", "--base", "base-model"]


def settings_command(**decorator: bool) -> tuple[click.Command, list[Settings]]:
    """A command that has the settings options alone and keeps the ``settings`` it is called with."""
    seen: list[Settings] = []

    @click.command()
    @settings_options(**decorator)
    @scale_options
    def command(settings: Settings) -> None:
        seen.append(settings)

    return command, seen


def option_names(command: click.Command) -> dict[str, tuple[str, ...]]:
    return {p.name: tuple(p.opts) for p in command.params if p.name is not None}


def test_every_settings_option_is_a_field_and_every_field_an_option() -> None:
    command, _ = settings_command()
    assert set(option_names(command)) == FIELDS


def test_every_option_reaches_its_field() -> None:
    assert set(EVERY) == FIELDS and all(EVERY[f.name] != f.default for f in fields(Settings))
    command, seen = settings_command()
    result = CliRunner().invoke(command, EVERY_ARGS)
    assert result.exit_code == 0, result.output
    assert seen == [Settings(**EVERY)]
    CliRunner().invoke(command, [])
    assert seen[1] == Settings()


@pytest.mark.parametrize("command, left_out", [(analyze, set()), (sweep_command, set()),
                                               (compare, {"direction", "critical", "critical_tol"})])
def test_no_other_option_of_a_command_sets_a_field(command: click.Command, left_out: set[str]) -> None:
    """The options named like a field are the settings options themselves, so nothing else reaches Settings."""
    declared = option_names(settings_command()[0])
    assert {n: o for n, o in option_names(command).items() if n in FIELDS} == \
        {n: o for n, o in declared.items() if n not in left_out}


def test_keywords_and_an_evaluation_are_the_same_analysis() -> None:
    model = tiny_mlp(0)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    w1, batches, loss = perturbed(w0, 0.05), tiny_batches((7,)), resolve_loss("cross_entropy")
    by_keywords = analyze_pair(model, w0, w1, batches, loss, method="taylor", dtype=torch.float64).to_dict()
    by_object = analyze_pair(model, w0, w1, batches, loss, Evaluation(method="taylor", dtype="float64")).to_dict()
    assert by_keywords == by_object and by_object["method"] == "taylor" and by_object["dtype"] == "float64"
    overridden = analyze_pair(model, w0, w1, batches, loss, Evaluation(method="taylor"), dtype=torch.float64)
    assert overridden.to_dict() == by_object
    with pytest.raises(TypeError, match="methd"):
        analyze_pair(model, w0, w1, batches, loss, methd="taylor")


def test_the_settings_object_reaches_the_objective_whole(tmp_path, monkeypatch) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1))
    seen = []
    real = objective.Objective.__init__

    def spy(self, model, buffers, batches, loss, evaluation=Evaluation(), **kw) -> None:  # type: ignore[no-untyped-def]
        seen.append(evaluation)
        real(self, model, buffers, batches, loss, evaluation, **kw)

    monkeypatch.setattr(objective.Objective, "__init__", spy)
    settings = Settings(dtype="float64", device="cpu", seed=4, chunk_size=3)
    analyze_files(run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors", settings=settings)
    assert seen == [settings] and seen[0] is settings


def test_settings_key_leaves_out_what_changes_no_number() -> None:
    key = settings_key(Settings(), [])
    same = [Settings(chunk_size=0), Settings(chunk_size=7), Settings(device="cpu"), Settings(trust_code=True),
            Settings(stream=True), Settings(max_memory=10**9), Settings(critical_tol=0.01)]
    assert {settings_key(s, []) for s in same} == {key}
    assert settings_key(Settings(dtype=torch.float64), []) == settings_key(Settings(dtype="float64"), [])

    assert settings_key(Settings(), [], Extras()) == key  # a library sweep's and the command line's

    @dataclass(frozen=True)
    class Later(Settings):  # a setting added later that changes no number
        progress: bool = False

    assert settings_key(Later(progress=True), []) == key


def test_a_numbers_changing_setting_added_later_keeps_the_keys_at_its_default(monkeypatch) -> None:
    @dataclass(frozen=True)
    class Later(Settings):
        width: int = 0

    cases = [Settings(), Settings(dtype="float64", critical=True)]
    before = [settings_key(s, []) for s in cases]
    monkeypatch.setattr(sweep_module, "KEYED", (*sweep_module.KEYED, "width"))  # its one line
    monkeypatch.setattr(sweep_module, "Settings", Later)
    for settings, key in zip(cases, before):
        later = Later(**{f.name: getattr(settings, f.name) for f in fields(Settings)})
        assert settings_key(later, []) == key
        assert settings_key(replace(later, width=2), []) != key
        assert legacy_settings_key(later, []) == v1_key(settings)  # rows of version 1 stand for width 0 alone
        assert legacy_settings_key(replace(later, width=2), []) is None


def test_settings_key_changes_with_every_setting_that_changes_the_numbers() -> None:
    changed = [Settings(model="m.py:f"), Settings(loss="mse"), Settings(dtype="float64"), Settings(method="taylor"),
               Settings(train=True), Settings(seed=1), Settings(direction="neg-grad"), Settings(critical=True),
               Settings(critical=True, critical_tol=0.01), Settings(base="base-model")]
    keys = [settings_key(s, []) for s in [Settings(), *changed]]
    extras = [Extras(concentration=True), Extras(lanczos_steps=3), Extras(clip=0.1)]
    keys += [settings_key(Settings(), [], e) for e in extras]
    assert len(set(keys)) == len(keys)
    assert set(sweep_module.KEYED) == \
        {f.name for f in fields(Settings) if any(getattr(s, f.name) != f.default for s in changed)}


def v1_key(settings: Settings) -> str:
    """The settings key as version 1 wrote it, the formula restated: every field of Settings as it was then
    but the device, trust, streaming, the memory bound, and the critical search unless asked for."""
    then = ("model", "loss", "device", "dtype", "method", "train", "seed", "direction", "trust_code", "chunk_size",
            "critical", "critical_tol", "stream", "max_memory")
    left_out = ("device", "trust_code", "stream", "max_memory") + (() if settings.critical else ("critical", "critical_tol"))
    how = {k: getattr(settings, k) for k in then if k not in left_out}
    return hashlib.sha1(json.dumps([how, [], None], sort_keys=True).encode()).hexdigest()  # no --batch, no extras


@pytest.mark.parametrize("settings", [Settings(dtype="float64"), Settings(dtype="float64", critical=True)])
def test_legacy_key_is_the_v1_formula_and_differs_from_v2(settings: Settings) -> None:
    assert legacy_settings_key(settings, []) == v1_key(settings)
    assert settings_key(settings, []) != v1_key(settings)


def test_rows_of_v1_keys_are_resumed(tmp_path) -> None:
    """An output written with version-1 keys: its rows are done, its error rows retried, nothing rewritten."""
    run = record_run(tmp_path / "sgd", steps=(0, 1, 2))
    plan, settings, out = find_pairs([run]), Settings(dtype="float64"), tmp_path / "r.jsonl"
    sweep(plan, out, settings)
    old = v1_key(settings)
    rows = [{**r, "settings_key": old, "sweep_key": sweep_key(p, old)} for p, r in zip(plan.pairs, lines(out))]
    rows[2] = {k: rows[2][k] for k in ("run", "ckpt_t", "ckpt_t1", "settings_key", "sweep_key")} | {"error": "x"}
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = sweep(plan, out, settings)
    assert (summary.analysed, summary.skipped, summary.failed) == (1, 2, 0)
    now = lines(out)
    assert now[:2] == rows[:2] and len(now) == 3 and now[2]["settings_key"] == settings_key(settings, [])
    assert sweep(plan, out, settings).skipped == 3
    # a v1 row whose checkpoint changed since is stale, as a v2 row is
    stale = [{**rows[0], "sweep_key": "0" * 40}, *now[1:]]
    out.write_text("".join(json.dumps(r) + "\n" for r in stale))
    with pytest.raises(ZeroptimError, match="replace-stale"):
        sweep(plan, out, settings)


def test_a_sweep_resumes_across_chunk_sizes(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    plan, out = find_pairs([run]), tmp_path / "r.jsonl"
    sweep(plan, out, Settings(dtype="float64"))
    summary = sweep(plan, out, replace(Settings(dtype="float64"), chunk_size=3))
    assert (summary.analysed, summary.skipped) == (0, 1)


def test_rows_of_v1_keys_are_not_those_of_a_setting_v1_did_not_know(tmp_path, monkeypatch) -> None:
    @dataclass(frozen=True)
    class Later(Settings):
        width: int = 0

    run = record_run(tmp_path / "sgd", steps=(0,))
    plan, out = find_pairs([run]), tmp_path / "r.jsonl"
    sweep(plan, out)
    old = v1_key(Settings())
    out.write_text("".join(json.dumps({**r, "settings_key": old, "sweep_key": sweep_key(p, old)}) + "\n"
                           for p, r in zip(plan.pairs, lines(out))))
    monkeypatch.setattr(sweep_module, "KEYED", (*sweep_module.KEYED, "width"))
    monkeypatch.setattr(sweep_module, "Settings", Later)
    assert sweep(plan, out, Later(width=2)).analysed == 1
    assert sweep(plan, out, Later()).skipped == 1


def test_the_base_folder_is_keyed_by_its_resolved_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "llama").mkdir()
    monkeypatch.chdir(tmp_path)
    keys = {settings_key(Settings(base=b), []) for b in ("llama", "./llama", str(tmp_path / "llama"))}
    assert len(keys) == 1 and keys != {settings_key(Settings(base="other"), [])}
