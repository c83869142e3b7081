"""Fuzzing the readers: checkpoints, batches and their metadata, mutated from a valid pair by hypothesis.

Whatever the files hold, the command ends with exit 0, 1 or 2; on failure with one ``error:`` line that
names a file or a flag, nothing on stdout; the inputs are untouched; and no code named in them runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_cli import SPEC, make_pair, run, tree_hash

from zeroptim_cli.io.checkpoint import METADATA_KEY
from zeroptim_cli.io.files import read_safetensors

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
