"""A checkpoint is data, never code; an output never destroys anything; a wrong pair is flagged.

Each case is one that a new user or an attacker would try (issue: Trust): code named in metadata, outputs
over inputs and foreign files, concurrent and re-run sweeps, pairs that look wrong, malformed files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cli import SPEC, make_pair, run, tree_hash

from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.checkpoint import load_checkpoint, save_checkpoint
from zeroptim_cli.io.files import LockedFile, atomic_path, read_safetensors
from zeroptim_cli.io.layout import METADATA_KEY
from zeroptim_cli.models import MLP
from zeroptim_cli.training.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_ckpts"


def with_meta(path: Path, **changes: object) -> Path:
    """Rewrite ``path``'s zeroptim metadata with ``changes`` (a value of None removes the key)."""
    tensors, raw = read_safetensors(path, "checkpoint")
    meta = json.loads(raw[METADATA_KEY])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


HELPER = '''
import pathlib
from zeroptim_cli.models import MLP
def build(**kwargs):
    pathlib.Path(__file__).with_name("ran").touch()
    return MLP(**kwargs)
def loss(outputs, targets):
    pathlib.Path(__file__).with_name("ran_loss").touch()
    import torch.nn.functional as F
    return F.cross_entropy(outputs, targets)
'''


# --- code named in metadata ---------------------------------------------------------------------------------

def test_metadata_factory_os_system_never_runs(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    evil = {"factory": "os:system", "kwargs": {"command": f"touch {tmp_path / 'pwned'}"}}
    with_meta(a, model=evil), with_meta(b, model=evil)
    before = tree_hash(tmp_path)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and out == "" and not (tmp_path / "pwned").exists()
    assert err.count("\n") == 1 and err.startswith("error:")
    assert "'os:system'" in err and str(a) in err and "--trust-code" in err and "--model os:system" in err
    code, _, _ = run(capsys, "sweep", tmp_path, "-o", tmp_path / "r.jsonl", "--quiet")
    assert code == 3 and not (tmp_path / "pwned").exists()
    assert "--trust-code" in json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["error"]
    assert {k: v for k, v in tree_hash(tmp_path).items() if not k.endswith("r.jsonl")} == before


def test_helper_factory_beside_the_checkpoint_runs_only_with_consent(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    (tmp_path / "helper.py").write_text(HELPER)
    spec = {"factory": "helper.py:build", "kwargs": SPEC["kwargs"]}
    with_meta(a, model=spec), with_meta(b, model=spec)
    code, _, err = run(capsys, "analyze", a, b, "--json")
    assert code == 1 and "helper.py:build" in err and not (tmp_path / "ran").exists()
    code, out, _ = run(capsys, "analyze", a, b, "--json", "--model", tmp_path / "helper.py:build")
    assert code == 0 and json.loads(out)["num_examples"] == 6 and (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    code, out, _ = run(capsys, "analyze", a, b, "--json", "--trust-code")
    assert code == 0 and (tmp_path / "ran").exists()


def test_metadata_loss_spec_needs_consent_even_with_model(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    (tmp_path / "helper.py").write_text(HELPER)
    with_meta(a, loss="helper.py:loss")
    code, _, err = run(capsys, "analyze", a, b, "--model", "mlp")
    assert code == 1 and "helper.py:loss" in err and "--loss helper.py:loss" in err
    assert not (tmp_path / "ran_loss").exists()
    code, out, _ = run(capsys, "analyze", a, b, "--json", "--loss", tmp_path / "helper.py:loss")
    assert code == 0 and (tmp_path / "ran_loss").exists()
    reference = json.loads(out)["loss_t"]
    code, out, _ = run(capsys, "analyze", a, b, "--json", "--trust-code")
    assert code == 0 and json.loads(out)["loss_t"] == reference


def test_unknown_metadata_loss_is_bad_data_not_a_bad_flag(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    with_meta(a, loss="hinge")
    code, _, err = run(capsys, "analyze", a, b)
    assert code == 1 and "'hinge'" in err and str(a) in err


# --- outputs ------------------------------------------------------------------------------------------------

def test_output_over_an_input_is_refused(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    before = tree_hash(tmp_path)
    for target in (a, b, tmp_path / "batch.safetensors"):
        code, out, err = run(capsys, "analyze", a, b, "--batch", tmp_path / "batch.safetensors", "-o", target)
        assert code == 2 and out == "" and "-o" in err and "input" in err
    assert tree_hash(tmp_path) == before
    code, _, err = run(capsys, "sweep", tmp_path, "-o", tmp_path / "r.jsonl", "--csv", tmp_path / "r.jsonl")
    assert code == 2 and "--csv" in err
    code, _, err = run(capsys, "sweep", tmp_path, "-o", a)
    assert code == 2 and tree_hash(tmp_path) == before


def test_foreign_files_are_not_replaced_without_force(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for args in (["sweep", tmp_path, "-o", notes, "--quiet"], ["analyze", a, b, "-o", notes],
                 ["sweep", tmp_path, "-o", tmp_path / "r.jsonl", "--csv", notes, "--quiet"]):
        code, out, err = run(capsys, *args)
        assert code == 1 and notes.name in err and "--force" in err, args
        assert notes.read_text() == "my notes\n"
    image = tmp_path / "holiday.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    code, _, _ = run(capsys, "analyze", a, b, "-o", tmp_path / "r.json", "--quiet")
    assert code == 0
    code, _, err = run(capsys, "plot", tmp_path / "r.json", "-o", image)
    assert code == 1 and image.read_bytes().endswith(b"not ours")
    code, _, _ = run(capsys, "plot", tmp_path / "r.json", "-o", tmp_path / "fig.png", "--quiet")
    assert code == 0
    code, _, _ = run(capsys, "plot", tmp_path / "r.json", "-o", tmp_path / "fig.png", "--quiet")
    assert code == 0  # our own figure is replaced freely
    code, _, _ = run(capsys, "analyze", a, b, "-o", notes, "--force", "--quiet")
    assert code == 0 and json.loads(notes.read_text())["num_examples"] == 6


def test_second_sweep_on_one_output_fails_at_once(tmp_path, capsys) -> None:
    """The lock is on the output's identity: through a symlink or a hard link it is the same output."""
    make_pair(tmp_path / "run")
    out = tmp_path / "r.jsonl"
    out.touch()
    (tmp_path / "link.jsonl").symlink_to(out)
    os.link(out, tmp_path / "hard.jsonl")
    with LockedFile(out, "held by a test"):
        for name in ("r.jsonl", "link.jsonl", "hard.jsonl"):
            code, stdout, err = run(capsys, "sweep", tmp_path / "run", "-o", tmp_path / name, "--quiet")
            assert code == 1 and stdout == "" and name in err and "in use" in err, err
    code, _, _ = run(capsys, "sweep", tmp_path / "run", "-o", tmp_path / "link.jsonl", "--quiet")
    assert code == 0 and (tmp_path / "link.jsonl").is_symlink() and len(out.read_text().splitlines()) == 1


def test_rerun_with_other_settings_keeps_earlier_rows(tmp_path, capsys) -> None:
    make_pair(tmp_path)
    out = tmp_path / "r.jsonl"
    assert run(capsys, "sweep", tmp_path, "-o", out, "--quiet")[0] == 0
    assert run(capsys, "sweep", tmp_path, "-o", out, "--quiet", "--dtype", "float64")[0] == 0
    assert run(capsys, "sweep", tmp_path, "-o", out, "--quiet", "--dtype", "float64")[0] == 0  # nothing new
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["dtype"] for r in rows) == ["float32", "float64"]


def test_row_without_ckpt_t_means_not_a_sweep_output(tmp_path, capsys) -> None:
    make_pair(tmp_path)
    out = tmp_path / "r.jsonl"
    out.write_text('{"loss_t": 1.0}\n')
    code, _, err = run(capsys, "sweep", tmp_path, "-o", out, "--quiet")
    assert code == 1 and "not a zeroptim sweep output" in err and out.read_text() == '{"loss_t": 1.0}\n'


def test_truncated_checkpoint_is_a_failed_pair_and_keeps_its_error_row(tmp_path, capsys) -> None:
    a, _ = make_pair(tmp_path)
    with_meta(a, step=7)
    out = tmp_path / "r.jsonl"
    a.write_bytes(b"")
    for _ in range(2):
        code, _, err = run(capsys, "sweep", tmp_path, "-o", out, "--quiet")
        assert code == 3 and "empty" in err
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 1 and "empty" in rows[0]["error"]


def test_disk_full_names_the_output(tmp_path, monkeypatch) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    target = tmp_path / "out.json"
    with pytest.raises(Exception, match=f"cannot write '{target}'.*No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
    assert list(tmp_path.iterdir()) == []  # no temporary file outlives the attempt


def test_plot_on_a_checkpoint_is_one_error_line(tmp_path, capsys) -> None:
    a, _ = make_pair(tmp_path)
    code, _, err = run(capsys, "plot", a, "-o", tmp_path / "x.png")
    assert code == 1 and err.count("\n") == 1 and str(a) in err and "not text" in err


# --- pair sanity ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    (("ckpt_000101", "ckpt_000100", "mlp_sgd", "mlp_sgd"), "swapped"),
    (("ckpt_000100", "ckpt_000102", "mlp_sgd", "mlp_sgd"), "not consecutive"),
    (("ckpt_000100", "ckpt_000101", "mlp_sgd", "mlp_adam"), "different runs"),
])
def test_pairs_that_look_wrong_are_flagged(capsys, case, expected) -> None:
    t, t1, run_t, run_t1 = case
    a, b = SAMPLES / run_t / f"{t}.safetensors", SAMPLES / run_t1 / f"{t1}.safetensors"
    batch = SAMPLES / "mlp_sgd" / "batch_000100.safetensors"
    code, out, err = run(capsys, "analyze", a, b, "--batch", batch, "--json")
    assert code == 0 and err == ""  # --json alone: the warnings are in the JSON only
    assert any(expected in w for w in json.loads(out)["warnings"])
    code, out, err = run(capsys, "analyze", a, b, "--batch", batch)
    assert code == 0 and expected in err and err.startswith("warning:")
    code, _, err = run(capsys, "analyze", a, b, "--batch", batch, "--quiet")
    assert err == ""


def test_a_good_pair_has_no_warning_and_cos_stays_in_range(capsys) -> None:
    run_dir = SAMPLES / "mlp_sgd"
    code, out, _ = run(capsys, "analyze", run_dir / "ckpt_000100.safetensors", run_dir / "ckpt_000101.safetensors",
                       "--json")
    payload = json.loads(out)
    assert code == 0 and payload["warnings"] == []
    assert -1.0 <= payload["cos_grad_update"] <= 1.0 and payload["cos_grad_update"] == pytest.approx(-1.0, abs=1e-6)


def test_mixed_dtypes_and_batchnorm_mode_are_flagged(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3, "batch_norm": True}}
    model = MLP(in_features=5, hidden=(4,), num_classes=3, batch_norm=True)
    save_batch(tmp_path / "batch.safetensors", torch.randn(6, 5), torch.randint(0, 3, (6,)))
    save_checkpoint(tmp_path / "a.safetensors", model, {"model": spec, "step": 0, "train_mode": True})
    save_checkpoint(tmp_path / "b.safetensors", model.double(), {"model": spec, "step": 1, "train_mode": True})
    code, out, _ = run(capsys, "analyze", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--batch",
                       tmp_path / "batch.safetensors", "--json")
    warnings = json.loads(out)["warnings"]
    assert code == 0 and any("dtypes" in w for w in warnings) and any("--train-mode" in w for w in warnings)


@pytest.mark.parametrize("meta", [{"optimizer": {"name": "sgd", "lr": 0.0}}, {"learning_rate": 0.0}])
def test_a_zero_step_at_a_recorded_learning_rate_of_0_is_said(tmp_path, capsys, meta) -> None:
    """The learning rate as the optimizer metadata records it, or as a Trainer folder's trainer_state.json
    logged it (metadata ``learning_rate``)."""
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    save_batch(tmp_path / "batch.safetensors", torch.randn(6, 5), torch.randint(0, 3, (6,)))
    for i, name in enumerate(("a", "b")):
        save_checkpoint(tmp_path / f"{name}.safetensors", model, {"model": SPEC, "step": i, **meta})
    code, out, _ = run(capsys, "analyze", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--batch",
                       tmp_path / "batch.safetensors", "--json")
    assert code == 0 and any("step is zero" in w and "learning rate is 0" in w for w in json.loads(out)["warnings"])


def test_nan_batch_is_an_error(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    save_batch(tmp_path / "nan.safetensors", torch.full((6, 5), float("nan")), torch.zeros(6, dtype=torch.long))
    code, out, err = run(capsys, "analyze", a, b, "--batch", tmp_path / "nan.safetensors")
    assert code == 1 and out == "" and "nan.safetensors" in err and "NaN" in err


# --- malformed metadata ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"model": ["mlp"]}, {"model": {"name": "mlp", "kwargs": "in_features=5"}}, {"batch": 3},
    {"batch": "/etc/passwd"}, {"batch": "../batch.safetensors"}, {"format": 2}, {"step": "seven"},
    {"model": {"factory": 5}}, {"optimizer": "sgd"},
])
def test_malformed_metadata_names_the_file(tmp_path, capsys, changes) -> None:
    a, b = make_pair(tmp_path)
    with_meta(a, **changes)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and out == "" and err.count("\n") == 1 and str(a) in err, err
    assert "Error" not in err  # no raw TypeError/AttributeError text


def test_integer_parameters_blame_the_checkpoint(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    tensors, raw = read_safetensors(a, "checkpoint")
    tensors = {k: v.long() if k.endswith("weight") else v for k, v in tensors.items()}
    save_file(tensors, str(a), metadata=raw)
    code, _, err = run(capsys, "analyze", a, b)
    assert code == 1 and str(a) in err and "floating point" in err


def test_tensors_do_not_depend_on_the_file_after_reading(tmp_path) -> None:
    """Read into memory, not memory-mapped: a file truncated under us cannot crash the process (SIGBUS)."""
    a, _ = make_pair(tmp_path)
    ckpt = load_checkpoint(a)
    a.write_bytes(b"")
    assert all(torch.isfinite(t.sum()) for t in ckpt.tensors.values())


# --- runs that mix --------------------------------------------------------------------------------------------

def test_train_into_a_run_folder_refuses_without_overwrite(tmp_path, capsys) -> None:
    args = ["train", "--out", tmp_path / "run", "--steps", "3", "--batch-size", "8", "--record-every", "2", "--quiet"]
    assert run(capsys, *args)[0] == 0
    before = tree_hash(tmp_path / "run")
    code, _, err = run(capsys, *args, "--seed", "1")
    assert code == 1 and "not empty" in err and "--overwrite" in err and tree_hash(tmp_path / "run") == before
    assert run(capsys, *args, "--seed", "1", "--overwrite")[0] == 0
    assert tree_hash(tmp_path / "run") != before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary file, no lock


def test_record_every_2_folder_sweeps_with_no_flag(tmp_path, capsys) -> None:
    folder = tmp_path / "run"
    assert run(capsys, "train", "--out", folder, "--steps", "6", "--batch-size", "8", "--record-every", "2",
               "--quiet")[0] == 0
    code, _, err = run(capsys, "sweep", folder, "-o", tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert code == 0, err
    assert sorted((r["step_t"], r["step_t1"]) for r in rows) == [(0, 1), (2, 3), (4, 5)]
    assert "error" not in json.dumps(rows)


def test_recorder_refuses_a_run_folder_and_cleans_stale_temporaries(tmp_path) -> None:
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path, model, opt, steps=[0], model_spec=SPEC)
    with rec.step(0, torch.randn(4, 5), torch.randint(0, 3, (4,))):
        opt.step()
    rec.close()
    (tmp_path / ".ckpt_000000.safetensors.abc123.tmp").write_bytes(b"")  # left by a killed run
    with pytest.raises(Exception, match=r"already holds a run.*overwrite=True"):
        Recorder(tmp_path, model, opt, steps=[0], model_spec=SPEC)
    Recorder(tmp_path, model, opt, steps=[0], model_spec=SPEC, overwrite=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_sample_checkpoints_need_no_flag(capsys) -> None:
    """Built-in models recorded by zeroptim stay flag-free (the trust rule is for code only)."""
    copy = SAMPLES / "mlp_adam"
    code, out, _ = run(capsys, "analyze", copy / "ckpt_000100.safetensors", copy / "ckpt_000101.safetensors", "--json")
    assert code == 0 and json.loads(out)["warnings"] == []


def test_inputs_are_untouched_by_every_command(tmp_path, capsys) -> None:
    shutil.copytree(SAMPLES / "mlp_sgd", tmp_path / "run")
    before = tree_hash(tmp_path / "run")
    run(capsys, "analyze", tmp_path / "run/ckpt_000100.safetensors", tmp_path / "run/ckpt_000101.safetensors",
        "--quiet")
    run(capsys, "inspect", tmp_path / "run/ckpt_000100.safetensors", tmp_path / "run/ckpt_000101.safetensors")
    run(capsys, "sweep", tmp_path / "run", "-o", tmp_path / "r.jsonl", "--quiet")
    assert tree_hash(tmp_path / "run") == before


# --- metadata cannot ask for memory; bounded flags -------------------------------------------------------------

def test_metadata_model_far_larger_than_the_file_fails_before_allocating(tmp_path, capsys, monkeypatch) -> None:
    from zeroptim_cli import models

    devices = []

    def recording_mlp(**kwargs: object) -> torch.nn.Module:
        devices.append(torch.empty(0).device.type)  # where the factory's tensors go
        return MLP(**kwargs)

    monkeypatch.setitem(models.REGISTRY, "mlp", recording_mlp)
    a, b = make_pair(tmp_path)
    for hidden in (10**6, 10**12):  # 10¹² units: 2·10¹³ bytes if it were ever allocated
        spec = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [hidden], "num_classes": 3}}
        with_meta(a, model=spec), with_meta(b, model=spec)
        code, out, err = run(capsys, "analyze", a, b)
        assert code == 1 and out == "" and str(a) in err and f"({hidden}, 5)" in err, err
    assert devices == ["meta", "meta"]
    with_meta(a, model=SPEC), with_meta(b, model=SPEC)
    assert run(capsys, "analyze", a, b, "--quiet")[0] == 0 and devices[2:] == ["meta", "cpu"]


@pytest.mark.parametrize("args, flag", [
    (["--lanczos", "1000000000"], "--lanczos"), (["--lanczos", "40"], "--lanczos"),
    (["--hutchinson", "1000000000"], "--hutchinson"), (["--line-search", "--alphas", "-1:1:1000000000"], "--alphas"),
    (["--line-search", "--alphas", "-1:inf:5"], "--alphas"),
])
def test_probe_and_grid_counts_are_bounded(tmp_path, capsys, args, flag) -> None:
    a, b = make_pair(tmp_path)  # 39 parameters: 40 Lanczos steps are too many
    code, out, err = run(capsys, "analyze", a, b, *args)
    assert code == 2 and out == "" and flag in err, err
    if args == ["--lanczos", "40"]:
        assert "39 parameters" in err and run(capsys, "analyze", a, b, "--lanczos", "39", "--quiet")[0] == 0


# --- recorded batches stay in the checkpoint's folder ------------------------------------------------------------

def test_recorded_batch_links_out_of_the_folder_are_refused(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path / "run")
    (tmp_path / "outside").mkdir()
    shutil.move(tmp_path / "run" / "batch.safetensors", tmp_path / "outside" / "batch.safetensors")
    (tmp_path / "run" / "batch.safetensors").symlink_to(tmp_path / "outside" / "batch.safetensors")
    (tmp_path / "run" / "sub").symlink_to(tmp_path / "outside")
    for name in ("batch.safetensors", "sub/batch.safetensors"):
        with_meta(a, batch=name)
        for args in (["analyze", a, b], ["compare", a, b]):
            code, out, err = run(capsys, *args)
            assert code == 1 and out == "" and err.count("\n") == 1 and str(a) in err and "leads out" in err, err
        code, _, _ = run(capsys, "sweep", tmp_path / "run", "-o", tmp_path / f"{len(name)}.jsonl", "--quiet")
        assert code == 3 and "leads out" in (tmp_path / f"{len(name)}.jsonl").read_text()
    (tmp_path / "run" / "inner").mkdir()
    shutil.move(tmp_path / "outside" / "batch.safetensors", tmp_path / "run" / "inner" / "batch.safetensors")
    (tmp_path / "run" / "batch.safetensors").unlink()
    (tmp_path / "run" / "batch.safetensors").symlink_to(tmp_path / "run" / "inner" / "batch.safetensors")
    with_meta(a, batch="batch.safetensors")
    assert run(capsys, "analyze", a, b, "--quiet")[0] == 0  # a link that stays inside is fine


# --- unclear errors, named ---------------------------------------------------------------------------------------

def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_named_error(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    tensors, raw = read_safetensors(a, "checkpoint")
    save_file(tensors, str(a), metadata={METADATA_KEY: '{"format": 1, "x": ' + deep_json(200_000) + "}"})
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and out == "" and err.count("\n") == 1 and str(a) in err and "nested too deeply" in err
    header = ('{"x": ' + deep_json(200_000) + "}").encode()
    a.write_bytes(len(header).to_bytes(8, "little") + header)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and str(a) in err and "nested too deeply" in err and "Recursion" not in err
    out_file = tmp_path / "r.jsonl"
    out_file.write_text('{"ckpt_t": "x", "ckpt_t1": "y"}\n{"a": ' + deep_json(200_000) + "}\n")
    code, _, err = run(capsys, "plot", out_file, "-o", tmp_path / "p.png")
    assert code == 1 and str(out_file) in err and "nested too deeply" in err


def adam_copy(tmp_path: Path, **state_meta: object) -> tuple[Path, Path, Path]:
    """A copy of the Adam sample run, its state at step 100 with metadata keys changed
    (``optimizer__KEY`` changes a key of the recorded optimizer)."""
    run_dir = tmp_path / "adam"
    shutil.copytree(SAMPLES / "mlp_adam", run_dir)
    state = run_dir / "optim_000100.safetensors"
    tensors, raw = read_safetensors(state, "state")
    meta = json.loads(raw[METADATA_KEY])
    for key, value in state_meta.items():
        if key.startswith("optimizer__"):
            meta["optimizer"][key.removeprefix("optimizer__")] = value
        else:
            meta[key] = value
    save_file(tensors, str(state), metadata={METADATA_KEY: json.dumps(meta)})
    return run_dir / "ckpt_000100.safetensors", run_dir / "ckpt_000101.safetensors", state


@pytest.mark.parametrize("change", [{"param_groups": "x"}, {"format": 2}, {"param_groups": 0}, {"optimizer": "adam"},
                                    {"optimizer__lr": "0.001"}, {"optimizer__betas": [2.0, 0.999]},
                                    {"optimizer__betas": "b"}, {"groups": "x"}, {"groups": [{"params": ["nope"]}]},
                                    {"groups": [{"params": [1]}]}])
def test_bad_optimizer_state_metadata_is_bad_data_naming_the_file(tmp_path, capsys, change) -> None:
    a, b, state = adam_copy(tmp_path, **change)
    for args in (["compare", a, b], ["analyze", a, b, "--direction", "adam"]):
        code, out, err = run(capsys, *args)
        assert code == 1 and out == "" and err.count("\n") == 1 and str(state) in err, (args, err)
        assert "invalid literal" not in err and "Error:" not in err


@pytest.mark.parametrize("spec", [".mod:fn", "..mod:fn", "a..b:fn", "mod.:fn"])
def test_relative_module_specs_are_usage_errors(tmp_path, capsys, spec) -> None:
    a, b = make_pair(tmp_path)
    for flag in ("--model", "--loss"):
        code, out, err = run(capsys, "analyze", a, b, flag, spec)
        assert code == 2 and out == "" and err.count("\n") == 1 and flag in err and spec in err, err


def test_a_module_that_fails_to_import_is_named(tmp_path, capsys, monkeypatch) -> None:
    a, b = make_pair(tmp_path)
    (tmp_path / "broken_mod.py").write_text("raise TypeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "analyze", a, b, "--model", "broken_mod:build")
    assert code == 1 and err.count("\n") == 1 and "broken_mod" in err and "broken on purpose" in err


PRINTING = '''
from zeroptim_cli.models import MLP
def build(**kwargs):
    print("hello from the factory")
    return MLP(**kwargs)
'''


def test_user_code_printing_cannot_break_json(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    (tmp_path / "printing.py").write_text(PRINTING)
    code, out, err = run(capsys, "analyze", a, b, "--json", "--model", f"{tmp_path}/printing.py:build")
    assert code == 0 and json.loads(out)["num_examples"] == 6 and "hello from the factory" in err
    code, out, err = run(capsys, "compare", a, b, "--json", "--model", f"{tmp_path}/printing.py:build")
    assert code == 0 and json.loads(out)["directions"] and "hello" in err
    code, out, err = run(capsys, "sweep", tmp_path, "-o", tmp_path / "r.jsonl", "--model",
                         f"{tmp_path}/printing.py:build", "--quiet")
    assert code == 0 and out == "" and "hello" in err


# --- interrupts and closed pipes ----------------------------------------------------------------------------------

INTERRUPTING = '''
import os, pathlib, signal
from zeroptim_cli.models import MLP
calls = 0
def build(**kwargs):
    global calls
    calls += 1
    if calls == 3 and not pathlib.Path(__file__).with_name("calm").exists():  # the second pair's first build
        os.kill(os.getpid(), signal.SIGINT)
    return MLP(**kwargs)
'''


def test_sigint_during_a_sweep_exits_130_and_says_it_resumes(tmp_path, capsys) -> None:
    folder = tmp_path / "run"
    assert run(capsys, "train", "--out", folder, "--steps", "4", "--batch-size", "8", "--record-every", "1",
               "--quiet")[0] == 0
    (tmp_path / "interrupting.py").write_text(INTERRUPTING)
    args = ["sweep", folder, "-o", tmp_path / "r.jsonl", "--model", f"{tmp_path}/interrupting.py:build", "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 130 and out == "" and err.count("\n") == 1 and err.startswith("error: interrupted")
    assert "1 pair(s)" in err and str(tmp_path / "r.jsonl") in err and "rerun the same command to resume" in err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1
    (tmp_path / "calm").touch()
    code, _, err = run(capsys, *args[:-1])
    assert code == 0 and "3 analysed, 1 already done" in err


def test_sigint_elsewhere_exits_130(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    (tmp_path / "calm").unlink(missing_ok=True)
    (tmp_path / "interrupting.py").write_text(INTERRUPTING.replace("calls == 3", "calls == 1"))
    code, out, err = run(capsys, "analyze", a, b, "--model", f"{tmp_path}/interrupting.py:build", "-o",
                         tmp_path / "r.json")
    assert code == 130 and out == "" and err.count("\n") == 1 and "interrupted" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args", [["--per-layer"], ["--json"]])
def test_a_closed_stdout_ends_quietly(tmp_path, args) -> None:
    a, b = make_pair(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "zeroptim_cli", "analyze", str(a), str(b), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdout.close()  # as `| head` does once it has its lines
    err = p.stderr.read()
    assert p.wait(timeout=120) in (0, 141) and err == b""


# --- python -m never imports from the working directory -------------------------------------------------------

def test_python_m_ignores_modules_in_the_working_directory(tmp_path) -> None:
    a, _ = make_pair(tmp_path)
    for name in ("dataclasses", "json", "typing", "enum", "contextlib", "torch", "safetensors", "click"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'a').write({name!r})\n")
    done = subprocess.run([sys.executable, "-m", "zeroptim_cli", "inspect", str(a), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["checkpoint"], done.stderr
    assert not (tmp_path / "PWNED").exists()


def test_metadata_kwargs_the_model_does_not_take_name_the_file(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    spec = {"name": "mlp", "kwargs": {**SPEC["kwargs"], "num_clases": 3}}
    with_meta(a, model=spec), with_meta(b, model=spec)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and out == "" and err.count("\n") == 1 and str(a) in err and "num_clases" in err, err
