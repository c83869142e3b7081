"""Outputs destroy nothing: no special file is replaced, no file a command reads is written over (however
it is named), a foreign file needs --force even when empty; sweep outputs survive links and hand edits."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_cli import make_pair, run, tree_hash
from test_trust import HELPER, SAMPLES

from zeroptim_cli.io.batches import load_batch, save_batch
from zeroptim_cli.io.outputs import Inputs

# --- special files and foreign files -------------------------------------------------------------------------


def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, a directory and (where the system lets us make one) a character device node."""
    made = {"FIFO": folder / "fifo", "socket": folder / "sock", "directory": folder / "dir"}
    os.mkfifo(made["FIFO"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(made["socket"]))
    sock.close()
    made["directory"].mkdir()
    try:
        os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made["character device"] = folder / "null"
    except OSError:
        pass
    return made


def test_special_files_at_an_output_path_are_refused_at_once(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path / "run")
    assert run(capsys, "analyze", a, b, "-o", tmp_path / "r.json", "--quiet")[0] == 0
    for kind, path in special_files(tmp_path).items():
        for args in (["analyze", a, b, "-o", path], ["analyze", a, b, "-o", path, "--force"],
                     ["sweep", tmp_path / "run", "-o", path, "--quiet"],
                     ["sweep", tmp_path / "run", "-o", tmp_path / "s.jsonl", "--csv", path, "--force", "--quiet"],
                     ["plot", tmp_path / "r.json", "-o", path, "--force"]):
            mode = os.lstat(path).st_mode
            code, out, err = run(capsys, *args)
            assert code == 2 and out == "" and err.count("\n") == 1, (args, err)
            assert err.startswith("error:") and str(path) in err and kind in err and "regular file" in err
            assert os.lstat(path).st_mode == mode  # still what it was: not replaced by a file


def test_dev_null_is_not_replaced(capsys, tmp_path) -> None:
    a, b = make_pair(tmp_path)
    code, _, err = run(capsys, "analyze", a, b, "-o", "/dev/null", "--force")
    assert code == 2 and "character device" in err and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_an_empty_foreign_file_needs_force(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path / "run")
    assert run(capsys, "analyze", a, b, "-o", tmp_path / "r.json", "--quiet")[0] == 0
    for name, args in (("e.json", ["analyze", a, b, "-o"]), ("e.png", ["plot", tmp_path / "r.json", "-o"]),
                       ("e.csv", ["sweep", tmp_path / "run", "-o", tmp_path / "s.jsonl", "--quiet", "--csv"])):
        empty = tmp_path / name
        empty.touch()
        code, _, err = run(capsys, *args, empty)
        assert code == 1 and "--force" in err and empty.read_bytes() == b"", args
        assert run(capsys, *args, empty, "--force")[0] == 0
        assert empty.stat().st_size > 0
    # a sweep output is appended to, never replaced: an empty file takes the rows
    (tmp_path / "new.jsonl").touch()
    assert run(capsys, "sweep", tmp_path / "run", "-o", tmp_path / "new.jsonl", "--quiet")[0] == 0
    assert len((tmp_path / "new.jsonl").read_text().splitlines()) == 1


def test_writing_through_a_symlink_keeps_the_link(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path / "run")
    (tmp_path / "results").mkdir()
    (tmp_path / "link.json").symlink_to(tmp_path / "results" / "r.json")
    assert run(capsys, "analyze", a, b, "-o", tmp_path / "link.json", "--quiet")[0] == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "results" / "r.json").read_text())


# --- every file a command reads is an input ------------------------------------------------------------------


def adam_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    run_dir = tmp_path / "adam"
    shutil.copytree(SAMPLES / "mlp_adam", run_dir)
    return run_dir, run_dir / "ckpt_000100.safetensors", run_dir / "ckpt_000101.safetensors"


def aliases(path: Path, folder: Path) -> list[Path]:
    """``path`` spelled with '..', through a symlink, and as a hard link."""
    folder.mkdir(exist_ok=True)
    sym, hard = folder / f"sym_{path.name}", folder / f"hard_{path.name}"
    sym.symlink_to(path)
    os.link(path, hard)
    return [path, path.parent / ".." / path.parent.name / path.name, sym, hard]


def test_no_output_onto_any_file_read(tmp_path, capsys) -> None:
    run_dir, a, b = adam_run(tmp_path)
    (run_dir / "helper.py").write_text(HELPER)
    shutil.copy(a, tmp_path / "direction.safetensors")
    named = ["--model", f"{run_dir}/helper.py:build", "--loss", f"{run_dir}/helper.py:loss",
             "--direction", tmp_path / "direction.safetensors"]
    read = [run_dir / "batch_000100.safetensors", run_dir / "optim_000100.safetensors", run_dir / "helper.py",
            tmp_path / "direction.safetensors"]
    before = tree_hash(tmp_path)
    for i, target in enumerate(read):
        for alias in aliases(target, tmp_path / f"aliases{i}"):
            for args in (["analyze", a, b, *named, "-o", alias, "--force"],
                         ["sweep", run_dir, *named, "-o", alias, "--force"],
                         ["sweep", run_dir, *named, "-o", tmp_path / "s.jsonl", "--csv", alias, "--force"]):
                code, out, err = run(capsys, *args)
                assert code == 2 and out == "" and "inputs" in err and str(alias) in err, (args, err)
    assert {k: v for k, v in tree_hash(tmp_path).items() if "aliases" not in k} == before
    state = run_dir / "optim_000101.safetensors"
    code, _, err = run(capsys, "compare", a, "--state", state, "-o", state, "--force")
    assert code == 2 and "inputs" in err
    code, _, err = run(capsys, "plot", tmp_path / "aliases0" / "hard_batch_000100.safetensors", "-o",
                       run_dir / "batch_000100.safetensors", "--force")
    assert code == 2 and tree_hash(tmp_path).items() >= before.items()


def test_a_spec_file_found_beside_the_checkpoint_is_an_input(tmp_path, capsys, monkeypatch) -> None:
    a, b = make_pair(tmp_path / "run")
    (tmp_path / "run" / "helper.py").write_text(HELPER)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # helper.py is not here: it is found beside the checkpoint
    assert run(capsys, "analyze", a, b, "--model", "helper.py:build", "--quiet")[0] == 0
    code, _, err = run(capsys, "analyze", a, b, "--model", "helper.py:build", "-o", tmp_path / "run" / "helper.py",
                       "--force")
    assert code == 2 and "inputs" in err and (tmp_path / "run" / "helper.py").read_text() == HELPER


def test_two_outputs_that_are_one_file_are_refused(tmp_path, capsys) -> None:
    make_pair(tmp_path / "run")
    out = tmp_path / "s.jsonl"
    out.touch()
    os.link(out, tmp_path / "same.csv")
    code, _, err = run(capsys, "sweep", tmp_path / "run", "-o", out, "--csv", tmp_path / "same.csv", "--force")
    assert code == 2 and "--csv" in err and "also the output of -o" in err


def test_inputs_compare_by_path_and_identity(tmp_path) -> None:
    a, _ = make_pair(tmp_path)
    os.link(a, tmp_path / "hard")
    (tmp_path / "sym").symlink_to(a)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    inputs = Inputs([a, tmp_path / "folder"])
    for p in (a, tmp_path / "hard", tmp_path / "sym", tmp_path / "folder" / ".." / "a.safetensors",
              tmp_path / "folder" / "config.json"):
        assert p in inputs, p
    assert tmp_path / "b.safetensors" not in inputs and tmp_path / "folder" / "new.json" not in inputs


# --- sweep outputs: identity, keys, hand edits -----------------------------------------------------------------


def sweep_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_editing_a_recorded_batch_makes_its_rows_stale(tmp_path, capsys) -> None:
    a, _ = make_pair(tmp_path / "run")
    out = tmp_path / "s.jsonl"
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet")[0] == 0
    old = sweep_rows(out)[0]["loss_t"]
    batch = load_batch(tmp_path / "run" / "batch.safetensors")
    save_batch(tmp_path / "run" / "batch.safetensors", batch.inputs * 3, batch.targets)  # same size, other content
    os.utime(tmp_path / "run" / "batch.safetensors", ns=(0, 0))  # and an old time: only the content tells
    code, _, err = run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet")
    assert code == 1 and "--replace-stale" in err and "batches" in err and sweep_rows(out)[0]["loss_t"] == old
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet", "--replace-stale")[0] == 0
    rows = sweep_rows(out)
    assert len(rows) == 1 and rows[0]["loss_t"] != old
    code, payload, _ = run(capsys, "analyze", a, tmp_path / "run" / "b.safetensors", "--json")
    assert rows[0]["loss_t"] == json.loads(payload)["loss_t"]


def test_a_last_row_without_its_newline_is_repaired(tmp_path, capsys) -> None:
    make_pair(tmp_path / "run")
    out = tmp_path / "s.jsonl"
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet")[0] == 0
    out.write_text(out.read_text().rstrip("\n"))
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet", "--dtype", "float64")[0] == 0
    assert sorted(r["dtype"] for r in sweep_rows(out)) == ["float32", "float64"]
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet", "--dtype", "float64")[0] == 0
    assert len(sweep_rows(out)) == 2


def test_stray_lines_are_moved_aside_and_rows_kept(tmp_path, capsys) -> None:
    make_pair(tmp_path / "run")
    out = tmp_path / "s.jsonl"
    assert run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet", "--dtype", "float64")[0] == 0
    row = out.read_bytes()
    stray = [b"# my note", b'{"loss_t": 1.0}', b'{"ckpt_t": ', b"\xff\xfe"]
    out.write_bytes(b"\n".join(stray) + b"\n" + row)
    code, _, err = run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet")
    assert code == 0 and err.count("warning:") == 1 and "4 line(s)" in err and "s.jsonl.rejected" in err
    assert sorted(r["dtype"] for r in sweep_rows(out)) == ["float32", "float64"]  # the earlier row is kept
    aside = (tmp_path / "s.jsonl.rejected").read_bytes().splitlines()
    assert aside == stray


def test_a_foreign_file_needs_force_and_force_keeps_its_lines(tmp_path, capsys) -> None:
    make_pair(tmp_path / "run")
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nline two\n")
    code, _, err = run(capsys, "sweep", tmp_path / "run", "-o", notes, "--quiet")
    assert code == 1 and "--force" in err and notes.read_text() == "line one\nline two\n"
    assert run(capsys, "sweep", tmp_path / "run", "-o", notes, "--quiet", "--force")[0] == 0
    assert len(sweep_rows(notes)) == 1 and (tmp_path / "notes.txt.rejected").read_text() == "line one\nline two\n"


def test_disk_full_during_a_sweep_names_the_output(tmp_path, capsys, monkeypatch) -> None:
    make_pair(tmp_path / "run")
    out = tmp_path / "s.jsonl"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, stdout, err = run(capsys, "sweep", tmp_path / "run", "-o", out, "--quiet")
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert f"cannot write '{out}'" in err and "No space left" in err and "resumes" in err


def test_unreadable_file_is_bad_input_not_bad_usage(tmp_path, capsys, monkeypatch) -> None:
    """click would check readability itself and call it a usage error (exit 2); reading says why (exit 1)."""
    a, b = make_pair(tmp_path)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    assert run(capsys, "analyze", a, b, "--quiet")[0] == 0
    original = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name in ("a.safetensors", "batch.safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 1 and out == "" and str(a) in err and "Permission denied" in err
    monkeypatch.setattr(Path, "read_bytes", lambda self: original(self) if self.name != "batch.safetensors"
                        else denied(self))
    code, _, err = run(capsys, "analyze", a, b, "--batch", tmp_path / "batch.safetensors")
    assert code == 1 and "batch.safetensors" in err and "Permission denied" in err


def test_rows_of_a_recorded_batch_key_include_its_content(tmp_path, capsys) -> None:
    """Two pairs whose checkpoints are byte-identical but whose recorded batches differ are two results."""
    a, b = make_pair(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    batch = load_batch(tmp_path / "two" / "batch.safetensors")
    save_file({"inputs": batch.inputs * 2, "targets": batch.targets}, str(tmp_path / "two" / "batch.safetensors"))
    out = tmp_path / "s.jsonl"
    assert run(capsys, "sweep", tmp_path / "one", tmp_path / "two", "-o", out, "--quiet")[0] == 0
    rows = sweep_rows(out)
    assert len({r["sweep_key"] for r in rows}) == 2 and len({r["loss_t"] for r in rows}) == 2


@pytest.mark.parametrize("flag", ["--lanczos", "--hutchinson"])
def test_probe_counts_are_bounded(tmp_path, capsys, flag) -> None:
    a, b = make_pair(tmp_path)
    code, out, err = run(capsys, "analyze", a, b, flag, "1000000000")
    assert code == 2 and out == "" and flag in err
