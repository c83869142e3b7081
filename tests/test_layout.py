"""The on-disk layout (``io.layout``): names ↔ steps, metadata written ↔ parsed, the scan of a run folder,
and the same layout from the Recorder and from the Trainer callback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.files import read_safetensors
from zeroptim_cli.io.layout import (
    BASE_FILE,
    BASE_ROLE,
    BATCH,
    CHECKPOINT,
    KINDS,
    METADATA_KEY,
    RUN_FILE,
    STATE,
    Named,
    StateMetadata,
    batch_entry,
    batch_name,
    ckpt_name,
    encode_metadata,
    kind_of,
    parse_metadata,
    parse_name,
    parse_state_metadata,
    recorded_batch_paths,
    run_files,
    scan_run,
    state_metadata,
    state_name,
    step_in_name,
    versions,
)
from zeroptim_cli.models import MLP
from zeroptim_cli.training.recorder import Recorder


def test_names_are_the_contract_s() -> None:
    assert ckpt_name(120) == "ckpt_000120.safetensors"
    assert batch_name(120) == "batch_000120.safetensors" and batch_name(7, 1) == "batch_000007_1.safetensors"
    assert state_name(3) == "optim_000003.safetensors" and ckpt_name(1234567) == "ckpt_1234567.safetensors"
    with pytest.raises(ValueError):
        STATE.name(3, 0)  # one state per step


@pytest.mark.parametrize("step", [0, 1, 120, 999_999, 1_000_000, 12_345_678])
def test_every_name_parses_back_to_its_step(step: int) -> None:
    for kind in KINDS:
        for index in ([None, 0, 1, 12] if kind.indexed else [None]):
            name = kind.name(step, index)
            assert parse_name(name) == Named(kind, step, index)
            assert kind_of(name) is kind and step_in_name(Path(name)) == step


@pytest.mark.parametrize("name", ["ckpt_12.safetensors", "ckpt_0000012.safetensors", "ckpt_000012_0.safetensors",
                                  "optim_000012_1.safetensors", "batch_000012_01.safetensors", "ckpt_000012.pt",
                                  "model_000012.safetensors", "ckpt-000012.safetensors", "ckpt_000012.safetensors.tmp"])
def test_names_not_written_by_zeroptim_do_not_parse(name: str) -> None:
    assert parse_name(name) is None


def test_steps_of_other_names_and_kinds_by_pattern() -> None:
    assert step_in_name(Path("checkpoint-40")) == 40 and step_in_name(Path("run3_model_17.safetensors")) == 17
    assert step_in_name(Path("model.safetensors")) is None
    assert kind_of("batch_custom.safetensors") is BATCH and kind_of("model.safetensors") is None


def test_checkpoint_metadata_round_trips_in_the_order_written(tmp_path) -> None:
    p = tmp_path / ckpt_name(3)
    meta = {"step": 3, "loss": "mse", "optimizer": {"name": "sgd", "lr": 0.1}, "model": {"name": "mlp"},
            **batch_entry([batch_name(3)])}
    raw = encode_metadata(meta)
    assert list(raw) == [METADATA_KEY]
    assert list(json.loads(raw[METADATA_KEY])) == ["format", "step", "loss", "optimizer", "model", "batch", "versions"]
    assert parse_metadata(raw, p) == {"format": 1, **meta, "versions": versions()}
    assert parse_metadata({}, p) == {}


def test_batch_entries_round_trip(tmp_path) -> None:
    for names in ([], ["batch_000003.safetensors"], ["batch_000003_0.safetensors", "batch_000003_1.safetensors"]):
        meta = parse_metadata(encode_metadata({"step": 3, **batch_entry(names)}), tmp_path / "c.safetensors")
        assert recorded_batch_paths(meta, tmp_path, tmp_path / "c.safetensors") == [tmp_path / n for n in names]
    assert batch_entry(["a"]) == {"batch": "a"} and batch_entry(["a", "b"]) == {"batches": ["a", "b"]}


def test_state_metadata_round_trips_and_is_checked(tmp_path) -> None:
    p = tmp_path / state_name(5)
    description = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999]}
    raw = encode_metadata(state_metadata(5, description, 2))
    parsed = parse_state_metadata(raw, p, step=5)
    assert (parsed.step, parsed.optimizer, parsed.param_groups) == (5, description, 2)
    assert parsed.meta["format"] == 1 and parsed.meta["versions"] == versions()
    assert parse_state_metadata({}, p) == StateMetadata()  # a state saved before states recorded their metadata
    with pytest.raises(ZeroptimError, match=f"'{p}' records step 5, its checkpoint 6"):
        parse_state_metadata(raw, p, step=6)
    with pytest.raises(ZeroptimError, match="param_groups"):
        parse_state_metadata(encode_metadata(state_metadata(5, description, 0)), p)


@pytest.mark.parametrize("kind", [CHECKPOINT, STATE])
def test_bad_metadata_names_the_file_and_its_kind(tmp_path, kind) -> None:
    p = tmp_path / kind.name(1)
    parse = (lambda raw: parse_metadata(raw, p)) if kind is CHECKPOINT else (lambda raw: parse_state_metadata(raw, p))
    for raw, what in [({METADATA_KEY: "{"}, "not valid JSON"), ({METADATA_KEY: "[1]"}, "JSON object"),
                      (encode_metadata({"format": 2}), "format 2")]:
        with pytest.raises(ZeroptimError, match=what) as info:
            parse(raw)
        assert str(info.value).startswith(f"{kind.what} '{p}': metadata '{METADATA_KEY}'")


def test_a_recorded_peft_model_s_keys_are_checked(tmp_path) -> None:
    p = tmp_path / ckpt_name(1)
    hf = {"hf_config": {"model_type": "gpt2"}}
    assert parse_metadata(encode_metadata({"base": BASE_FILE, "model": {**hf, "peft": {"r": 2}}}), p)["base"] == BASE_FILE
    for meta, what in [({"base": 3}, "key 'base' must be str"), ({"base": "../base.safetensors"}, "key 'base' must name"),
                       ({"base": "/tmp/base.safetensors"}, "key 'base' must name"),
                       ({"model": {**hf, "peft": "LORA"}}, "'model.peft' must be an object"),
                       ({"model": {"name": "mlp", "peft": {"r": 2}}}, "'model.peft' must be an object")]:
        with pytest.raises(ZeroptimError, match=what):
            parse_metadata(encode_metadata(meta), p)


def save(path: Path, meta: dict | None = None) -> None:
    save_file({"w": torch.zeros(2)}, str(path), metadata=encode_metadata(meta) if meta is not None else None)


def test_scan_run_finds_the_checkpoints_and_passes_over_the_rest(tmp_path) -> None:
    save(tmp_path / ckpt_name(4), {"step": 4, **batch_entry([batch_name(4)])})
    save(tmp_path / ckpt_name(5), {"step": 5})
    save(tmp_path / "model_9.safetensors")  # another tool's name: its number is its step
    (tmp_path / ckpt_name(12)).write_bytes(b"garbage")  # unreadable: a checkpoint whose pair fails
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")  # and with no number, one of its own
    save_batch(tmp_path / batch_name(4), torch.zeros(2, 1), torch.zeros(2))
    save_batch(tmp_path / "batch_custom.safetensors", {"input_ids": torch.zeros(2, 3)}, torch.zeros(2, 3))
    save_batch(tmp_path / "examples.safetensors", torch.zeros(2, 1), torch.zeros(2))  # a batch by its tensors
    save(tmp_path / state_name(4), {"step": 4})
    save(tmp_path / BASE_FILE, {"role": BASE_ROLE})  # a peft model's frozen base, no checkpoint of a step
    assert tmp_path / BASE_FILE in run_files(tmp_path)
    found = scan_run(tmp_path)
    assert sorted(found.steps) == [4, 5, 9, 12] and found.unnumbered == [tmp_path / "garbage.safetensors"]
    assert found.steps[4].batches == (tmp_path / batch_name(4),) and found.steps[5].batches == ()
    assert found.steps[12].error and found.steps[4].error is None
    save(tmp_path / "other_5.safetensors", {"step": 5})
    with pytest.raises(ZeroptimError, match="are both step 5"):
        scan_run(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZeroptimError, match="holds no checkpoints"):
        scan_run(tmp_path / "empty")
    with pytest.raises(ZeroptimError, match="not a directory"):
        scan_run(tmp_path / ckpt_name(4))


def layout_of(folder: Path) -> dict[int, set[tuple[str, int]]]:
    """Each recorded step's files, as (kind, step − recorded step); every file named by ``io.layout``, each
    checkpoint's recorded batches and each state's metadata agreeing with the names."""
    files = [p for p in run_files(folder) if p.name != RUN_FILE]
    assert sorted(files) == sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    named = {p: parse_name(p.name) for p in files}
    assert None not in named.values(), named
    recorded = sorted({n.step for n in named.values() if n.kind is STATE})
    scanned = scan_run(folder).steps
    out: dict[int, set[tuple[str, int]]] = {}
    for s in recorded:
        batches = sorted(p for p, n in named.items() if n.kind is BATCH and n.step == s)
        assert scanned[s].batches == tuple(batches) and scanned[s + 1].batches == ()
        state = parse_state_metadata(read_safetensors(folder / state_name(s), "state")[1], folder / state_name(s), s)
        ckpt_meta = parse_metadata(read_safetensors(folder / ckpt_name(s), "checkpoint")[1], folder / ckpt_name(s))
        assert state.step == s and state.optimizer["name"] == ckpt_meta["optimizer"]["name"] == "sgd"
        out[s] = {(n.kind.prefix, n.step - s) for n in named.values() if n.step in (s, s + 1)}
    return out


def test_recorder_and_trainer_callback_write_the_same_layout(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_hf_trainer import train

    from zeroptim_cli.integrations.hf import ZeroptimCallback

    torch.manual_seed(0)
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "rec", model, opt, steps=[0, 3], model_spec={"name": "mlp"})
    for step in range(4):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with rec.step(step, x, y):
            opt.step()
    rec.close()
    train(tmp_path / "hf", 2, ZeroptimCallback(steps=[0, 3]), steps=4)

    expected = {("ckpt", 0), ("ckpt", 1), ("batch", 0), ("optim", 0)}
    assert layout_of(tmp_path / "rec") == layout_of(tmp_path / "hf" / "zeroptim") == {0: expected, 3: expected}
    assert {p.name for p in (tmp_path / "hf" / "zeroptim").glob("batch_000003*")} == {batch_name(3, 0), batch_name(3, 1)}


def test_a_recorded_gradient_scale_is_checked_and_scales_the_step_taken_again(tmp_path) -> None:
    """optimizer.gradient_scale c: a positive number, else an error naming the file; replay_step steps with
    c·g, clipped after scaling (the loop clips the gradient it accumulated): against SGD by hand."""
    from zeroptim_cli.optim.state import replay_step

    p = tmp_path / "c.safetensors"
    sgd = {"name": "sgd", "lr": 0.5}
    assert parse_metadata(encode_metadata({"optimizer": {**sgd, "gradient_scale": 2}}), p)["optimizer"]["gradient_scale"] == 2
    for bad in (0, -1, True, "2", None):
        with pytest.raises(ZeroptimError, match=rf"'{p}'.*optimizer.gradient_scale"):
            parse_metadata(encode_metadata({"optimizer": {**sgd, "gradient_scale": bad}}), p)
    w = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([[3.0]], dtype=torch.float64)}
    g = {"a": torch.tensor([0.3, -0.4], dtype=torch.float64), "b": torch.tensor([[1.2]], dtype=torch.float64)}
    d = replay_step({**sgd, "gradient_scale": 3}, {}, w, g)
    assert all(torch.allclose(d[k], -0.5 * 3 * g[k], rtol=1e-15, atol=0) for k in w)
    d = replay_step({**sgd, "gradient_scale": 3, "max_grad_norm": 1.0}, {}, w, g)  # ‖3g‖ = 3·1.3 > 1
    assert all(torch.allclose(d[k], -0.5 * g[k] / (1.3 + 1e-6 / 3), rtol=1e-12, atol=0) for k in w)
    with pytest.raises(ZeroptimError, match="gradient_scale"):
        replay_step({**sgd, "gradient_scale": -1}, {}, w, g)
