"""A checkpoint is data, never code; an output never destroys anything; a wrong pair is flagged.

Each case is one that a new user or an attacker would try (issue: Trust): code named in metadata, outputs
over inputs and foreign files, concurrent and re-run sweeps, pairs that look wrong, malformed files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cli import SPEC, make_pair, run, tree_hash

from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.checkpoint import METADATA_KEY, load_checkpoint, save_checkpoint
from zeroptim_cli.io.files import LockedFile, atomic_path, read_safetensors
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
    with pytest.raises(Exception, match="already holds a run"):
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
