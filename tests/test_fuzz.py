"""Fuzzing the readers: checkpoints, batches and their metadata, mutated from a valid pair by hypothesis.

Whatever the files hold, the command ends with exit 0, 1 or 2; on failure with one ``error:`` line that
names a file or a flag, nothing on stdout; the inputs are untouched; and no code named in them runs. The
same for Hugging Face folders (config.json and index edits: no pickle is ever read), and sweep outputs
edited by hand lose no line.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_cli import SPEC, make_pair, run, tree_hash

from zeroptim_cli.io.files import read_safetensors
from zeroptim_cli.io.layout import METADATA_KEY

KEYS = ["format", "model", "step", "loss", "optimizer", "batch", "run_id", "train_mode", "extra"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
#: Specs that would run code, each with kwargs that would make it touch the marker file.
CODE = {"os:system": {"command": "touch MARKER"}, "subprocess:run": {"args": "touch MARKER", "shell": True},
        "helper.py:build": {}, "pathlib:Path.touch": {}}
code_specs = st.sampled_from([*CODE, "mlp", "nope"])


@st.composite
def metadata(draw: st.DrawFn, marker: str) -> object:
    """A metadata value: a mutation of a valid one, a model spec that would run code, or anything JSON."""
    base = {"format": 1, "model": SPEC, "step": 7, "batch": "batch.safetensors", "loss": "cross_entropy"}
    kind = draw(st.sampled_from([0, 1, 1, 2, 3]))
    if kind == 0:
        base[draw(st.sampled_from(KEYS))] = draw(json_values)
    elif kind == 1:
        spec = draw(code_specs)
        base["model"] = {"factory": spec, "kwargs": CODE[spec]} if spec in CODE else {"name": spec}
    elif kind == 2:
        base["loss"] = draw(code_specs | st.text(max_size=8))
    else:
        return draw(json_values)
    return base


@st.composite
def mutation(draw: st.DrawFn) -> dict[str, object]:
    return {
        "target": draw(st.sampled_from(["both", "both", "a", "b", "batch"])),
        "how": draw(st.sampled_from(["metadata", "metadata", "metadata", "raw_metadata", "bytes", "truncate", "tensor"])),
        "meta": draw(metadata("MARKER")),
        "raw": draw(st.text(max_size=30)),
        "offset": draw(st.integers(0, 2000)),
        "blob": draw(st.binary(min_size=1, max_size=16)),
        "tensor": draw(st.sampled_from(["int", "shape", "nan", "drop", "extra", "rename"])),
    }


HELPER = 'import pathlib\ndef build(**kw):\n    pathlib.Path(__file__).with_name("ran").touch()\n'


def mutate(folder: Path, m: dict[str, object]) -> None:
    """Apply the mutation ``m`` to one file of the pair, or to both checkpoints alike (so that a model spec
    in their metadata is consistent, the way an attacker would write it)."""
    if m["target"] == "both":
        for target in ("a", "b"):
            mutate(folder, {**m, "target": target})
        return
    path = folder / {"a": "a.safetensors", "b": "b.safetensors", "batch": "batch.safetensors"}[m["target"]]
    how = m["how"]
    if how in ("bytes", "truncate"):
        data = bytearray(path.read_bytes())
        at = int(m["offset"]) % len(data)
        data = data[:at] if how == "truncate" else data[:at] + bytearray(m["blob"]) + data[at + len(m["blob"]):]
        path.write_bytes(bytes(data))
        return
    tensors, raw = read_safetensors(path, "file")
    if how == "metadata":
        marker = str(folder / "pwned")
        raw = {METADATA_KEY: json.dumps(m["meta"]).replace("MARKER", marker)}
    elif how == "raw_metadata":
        raw = {METADATA_KEY: str(m["raw"])}
    else:
        name = sorted(tensors)[int(m["offset"]) % len(tensors)]
        t = tensors[name]
        change = m["tensor"]
        if change == "int":
            tensors[name] = t.long()
        elif change == "shape":
            tensors[name] = t.reshape(-1)[:-1].clone() if t.numel() > 1 else t.reshape(1, -1)
        elif change == "nan":
            tensors[name] = torch.full_like(t.double(), float("nan")).to(t.dtype) if t.is_floating_point() else t
        elif change == "drop" and len(tensors) > 1:
            del tensors[name]
        elif change == "extra":
            tensors["zz_extra"] = torch.zeros(2)
        elif change == "rename":
            tensors["renamed_" + name] = tensors.pop(name)
    save_file(tensors, str(path), metadata=raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation(), with_batch_flag=st.booleans())
def test_readers_fail_cleanly_and_run_no_code(capsys, m: dict[str, object], with_batch_flag: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        a, b = make_pair(folder)
        (folder / "helper.py").write_text(HELPER)
        mutate(folder, m)
        before = tree_hash(folder)
        capsys.readouterr()
        args = ["analyze", a, b, "--json"] + (["--batch", folder / "batch.safetensors"] if with_batch_flag else [])
        for command in (args, ["inspect", a, b, "--json"]):
            code, out, err = run(capsys, *command)
            assert code in (0, 1, 2), (code, err)
            if code:
                assert out == "", out
                assert err.count("\n") == 1 and err.startswith("error:"), err
                assert tmp in err or "--" in err, err  # names the file or the flag at fault
                assert "Traceback" not in err
            else:
                assert json.loads(out)
        assert tree_hash(folder) == before
        assert not (folder / "pwned").exists() and not (folder / "ran").exists()


# --- Hugging Face folders: config.json and index mutations ------------------------------------------------------

ARCHITECTURES = ["GPT2LMHeadModel", "GPT2Model", "PreTrainedModel", "GPT2PreTrainedModel", "AutoModel", "os",
                 "EvilForCausalLM", "BertForMaskedLM", "LlamaForCausalLM"]
SHARDS = ["model-00001-of-00001.safetensors", "pytorch_model.bin", "../outside.safetensors", "/etc/passwd",
          "linked.safetensors", "missing.safetensors", "config.json", ""]
CONFIG_KEYS = ["n_embd", "n_head", "n_layer", "vocab_size", "n_positions", "model_type", "auto_map",
               "trust_remote_code", "torch_dtype", "tie_word_embeddings", "use_cache"]


@st.composite
def folder_mutation(draw: st.DrawFn) -> dict[str, object]:
    return {
        "how": draw(st.sampled_from(["config", "config", "architectures", "raw_config", "index", "index", "raw_index"])),
        "key": draw(st.sampled_from(CONFIG_KEYS)),
        "value": draw(json_values),
        "architecture": draw(st.lists(st.sampled_from(ARCHITECTURES) | st.integers(), max_size=2)),
        "raw": draw(st.binary(max_size=40)),
        "shards": draw(st.lists(st.sampled_from(SHARDS) | json_values, min_size=1, max_size=3)),
        "target": draw(st.sampled_from(["a", "a", "both"])),
    }


def mutate_folder(folder: Path, m: dict[str, object]) -> None:
    config = json.loads((folder / "config.json").read_text())
    how = m["how"]
    if how == "config":
        config[str(m["key"])] = m["value"]
    elif how == "architectures":
        config["architectures"] = m["architecture"]
    if how in ("config", "architectures"):
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "raw_config":
        (folder / "config.json").write_bytes(bytes(m["raw"]))
    else:
        shard = folder / "model-00001-of-00001.safetensors"
        (folder / "model.safetensors").rename(shard)
        n = int.from_bytes(shard.read_bytes()[:8], "little")
        names = [k for k in json.loads(shard.read_bytes()[8:8 + n]) if k != "__metadata__"]
        shards = list(m["shards"])
        weight_map = {k: shards[i % len(shards)] if i < len(shards) else shard.name for i, k in enumerate(names)}
        (folder / "linked.safetensors").symlink_to(folder.parent / "outside.safetensors")
        if how == "index":
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            (folder / "model.safetensors.index.json").write_bytes(bytes(m["raw"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=folder_mutation())
# a class whose defaults make a 6.5 × 10⁹-weight model of the tiny GPT-2's config (Llama: 32 layers of width 4096):
# refused by its size on the meta device before any weight is allocated, not ~26 GB later (drawn by chance in ~3 %
# of runs, an OOM kill)
@example(m={"how": "architectures", "key": "n_embd", "value": None, "architecture": ["LlamaForCausalLM"], "raw": b"",
            "shards": [""], "target": "a"})
def test_hf_folders_fail_cleanly_and_read_no_pickle(capsys, m: dict[str, object]) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                                                                     n_positions=8, bos_token_id=0, eos_token_id=0))
        a, b = root / "checkpoint-1", root / "checkpoint-2"
        model.save_pretrained(a)
        with torch.no_grad():
            next(model.parameters()).add_(0.01)
        model.save_pretrained(b)
        (root / "outside.safetensors").write_bytes((a / "model.safetensors").read_bytes())
        os.environ["ZEROPTIM_TRAP"] = str(root / "unpickled")
        for folder in (a, b):
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
        for folder in ([a, b] if m["target"] == "both" else [a]):
            mutate_folder(folder, m)
        g = torch.Generator().manual_seed(0)
        save_file({"input_ids": torch.randint(0, 16, (2, 6), generator=g), "labels": torch.randint(0, 16, (2, 6),
                   generator=g)}, str(root / "batch.safetensors"))
        before = tree_hash(root)
        capsys.readouterr()
        for command in (["analyze", a, b, "--batch", root / "batch.safetensors", "--json"], ["inspect", a, b, "--json"]):
            code, out, err = run(capsys, *command)
            assert code in (0, 1, 2), (code, err)
            if code:
                assert out == "" and err.count("\n") == 1 and err.startswith("error:"), err
                assert tmp in err or "--" in err, err
                assert "Traceback" not in err and "(run with --debug" not in err, err
            else:
                assert json.loads(out)
        assert tree_hash(root) == before and not (root / "unpickled").exists()


class Trap:
    """Unpickling this creates a marker file: it must never happen."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (os.environ["ZEROPTIM_TRAP"], "w"))


# --- sweep outputs: line edits -----------------------------------------------------------------------------------------

@st.composite
def line_edit(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    kinds = st.sampled_from(["cut", "insert", "drop_newline", "duplicate", "garbage_line", "blank", "swap", "value"])
    return draw(st.lists(st.tuples(kinds, st.integers(0, 10**6), st.binary(min_size=1, max_size=12)),
                         min_size=1, max_size=3))


def edit_lines(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    lines = data.split(b"\n")[:-1]
    for kind, at, blob in edits:
        i = at % len(lines) if lines else 0
        if not lines:
            lines = [blob]
        elif kind == "cut":
            lines[i] = lines[i][: at % (len(lines[i]) + 1)]
        elif kind == "insert":
            j = at % (len(lines[i]) + 1)
            lines[i] = lines[i][:j] + blob + lines[i][j:]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "garbage_line":
            lines.insert(i, blob.replace(b"\n", b""))
        elif kind == "blank":
            lines.insert(i, b"")
        elif kind == "swap":
            lines.insert(0, lines.pop(i))
        elif kind == "value":
            lines[i] = lines[i].replace(b'"loss_t": ', b'"loss_t": "x", "was": ', 1)
    text = b"\n".join(lines)
    return text if any(k == "drop_newline" for k, _, _ in edits) else text + b"\n"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=line_edit())
def test_sweep_outputs_survive_line_edits(capsys, edits: list[tuple[str, int, bytes]]) -> None:
    """Whatever is edited, the rerun ends with 0, 1 or 3; refused, the file is untouched; otherwise every line
    of the edited file is still there, moved to the .rejected file, or a row of this sweep recomputed."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_pair(root / "run")
        out = root / "r.jsonl"
        for dtype in ("float64", "float32"):
            assert run(capsys, "sweep", root / "run", "-o", out, "--quiet", "--dtype", dtype)[0] == 0
        mine = json.loads(out.read_text().splitlines()[1])["settings_key"]
        edited = edit_lines(out.read_bytes(), edits)
        out.write_bytes(edited)
        code, stdout, err = run(capsys, "sweep", root / "run", "-o", out, "--quiet")
        assert code in (0, 1, 3) and stdout == "" and "Traceback" not in err, err
        assert all(line.startswith(("error:", "warning:")) for line in err.splitlines()), err
        if code == 1:
            assert out.read_bytes() == edited and err.count("\n") == 1
            return
        kept = out.read_bytes().splitlines()
        aside = (root / "r.jsonl.rejected").read_bytes().splitlines() if (root / "r.jsonl.rejected").exists() else []
        for line in edited.splitlines():
            if not line.strip() or line in kept or line in aside:
                continue
            row = json.loads(line)  # not kept, not aside: a row of this sweep, recomputed
            assert row["settings_key"] == mine
        # a row whose own key an edit garbled is kept as it is (rows are never dropped), under no settings: the
        # rerun writes rows under its own settings only, so every key kept was in the edited file or is its own
        def keys(lines: list[bytes]) -> set[str]:
            found = set()
            for line in lines:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("settings_key"), str):
                        found.add(row["settings_key"])
            return found
        assert out.read_bytes().endswith(b"\n") and keys(kept) <= keys(edited.splitlines()) | {mine}
