"""Issue 13 row 7: checkpoint edits are detected; a resume refuses a tampered or malformed checkpoint with a
ValueError naming the file and field (CLI: exit 2), never a raw traceback, a call by name into numpy, or a wrong
summary."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedamole.manifest import write_manifest
from fedamole.simulation.checkpoint import CHECKPOINT_JSON, load_checkpoint, save_checkpoint
from fedamole.simulation.cli import main
from fedamole.simulation.presets import make_config
from fedamole.simulation.runner import simulate

OVERRIDES = {"local_steps": 1, "clients": 4}


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """The checkpoint folder of a finished 1-round tiny run (copied by each test)."""
    folder = tmp_path_factory.mktemp("one_round") / "checkpoint"
    simulate(make_config("tiny", {"rounds": 1, **OVERRIDES}), progress=False, checkpoint_dir=folder)
    return folder


@pytest.fixture
def ckpt(one_round, tmp_path):
    return shutil.copytree(one_round, tmp_path / "checkpoint")


def _resume(folder, rounds=2):
    return simulate(
        make_config("tiny", {"rounds": rounds, **OVERRIDES}), progress=False, checkpoint_dir=folder, resume=True
    )


def _edit_json(folder, edit):
    """Edit round-1.json in place and re-hash it (a forger, or a buggy writer): the semantic checks must catch it."""
    path = folder / "round-1.json"
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    write_manifest(
        folder / CHECKPOINT_JSON, "fedamole-checkpoint", ("round-1.json", "round-1.safetensors"), {"round": 1}
    )


def _edit_state(folder, edit, round_idx=1):
    """Edit the decoded state and save it as a consistent checkpoint of `round_idx`."""
    _, state = load_checkpoint(folder)
    edit(state)
    save_checkpoint(folder, round_idx, state)


def _first_module(state):
    return next(iter(state["algorithm"]["modules"].values()))


def _nan_pool(state):
    _first_module(state)["pool"]["lora_b"][0, 0, 0] = float("nan")


def _all_true_assignment(state):
    assign = _first_module(state)["assign"]
    assign[...] = True


def _wrong_pool_shape(state):
    pool = _first_module(state)["pool"]
    pool["lora_a"] = pool["lora_a"][:-1]


def _drop_pool_key(state):
    del _first_module(state)["pool"]["router"]


def _history_edit(state):
    state["history"][0]["round"] = 7


def _rng_as_string(state):
    state["algorithm"]["rng"] = "seed"


SEMANTIC = {  # consistent hashes, wrong content: (edit of the decoded state, the field the error names)
    "NaN in a pool": (_nan_pool, r"pool\.lora_b: contains NaN"),
    "all-true assignment": (_all_true_assignment, r"assign.*exactly"),
    "pool of the wrong shape": (_wrong_pool_shape, r"pool\.lora_a: has shape"),
    "pool tensor missing": (_drop_pool_key, r"pool: lacks the keys \['router'\]"),
    "history round edited": (_history_edit, r"history\.0"),
    "generator replaced by a str": (_rng_as_string, r"algorithm\.rng: must be a random generator"),
}


@pytest.mark.parametrize("case", SEMANTIC)
def test_semantically_wrong_checkpoint_is_refused_naming_the_field(ckpt, case):
    edit, match = SEMANTIC[case]
    _edit_state(ckpt, edit)
    with pytest.raises(ValueError, match=match):
        _resume(ckpt)


def test_round_number_edit_is_refused(ckpt):
    original = (ckpt / CHECKPOINT_JSON).read_text()
    manifest = json.loads(original)
    manifest["round"] = 2
    (ckpt / CHECKPOINT_JSON).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest_sha256"):
        _resume(ckpt, rounds=3)
    (ckpt / CHECKPOINT_JSON).write_text(original)
    _edit_state(ckpt, lambda state: None, round_idx=2)  # consistent files claiming a round that history lacks
    with pytest.raises(ValueError, match=r"history: must list the 2 rounds done, got 1"):
        _resume(ckpt, rounds=3)


def test_every_byte_of_the_state_json_is_covered(ckpt):
    path = ckpt / "round-1.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(ckpt)


def _set_generator(name):
    def edit(body):
        def walk(node):
            if isinstance(node, dict):
                if "__np_generator__" in node:
                    node["__np_generator__"] = name
                    return True
                return any(walk(v) for v in node.values())
            return isinstance(node, list) and any(walk(v) for v in node)

        assert walk(body["state"])

    return edit


def _set_path(*keys, value):
    def edit(body):
        node = body
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _first_tensor_node(body):
    pool = body["state"]["__dict__"]["algorithm"]["__dict__"]["modules"]["__dict__"]
    return next(iter(pool.values()))["__dict__"]["pool"]["__dict__"]["lora_a"]


def _tensor_ref(value):
    return lambda body: _first_tensor_node(body).update({"__tensor__": value})


def _assign_dtype(value):
    def edit(body):
        modules = body["state"]["__dict__"]["algorithm"]["__dict__"]["modules"]["__dict__"]
        next(iter(modules.values()))["__dict__"]["assign"]["dtype"] = value

    return edit


MALFORMED = {  # (edit of round-1.json, re-hashed; the message the ValueError must carry)
    "generator by another name": (_set_generator("default_rng"), "PCG64"),
    "generator MT19937": (_set_generator("MT19937"), "PCG64"),
    "generator state out of range": (
        _set_path("state", "__dict__", "algorithm", "__dict__", "rng", "state", "state", "state", value=1 << 200),
        r"state\.state must be an int",
    ),
    "tensor reference outside the file": (_tensor_ref("../../etc/passwd"), "does not hold"),
    "tensor reference of another type": (_tensor_ref(3), "__tensor__"),
    "array of dtype object": (_assign_dtype("object"), "dtype"),
    "array dtype mismatching the stored one": (_assign_dtype("float64"), "dtype"),
    "unknown node": (_set_path("state", "__dict__", "extra", value={"__pickle__": "x"}), "unknown node"),
    "round differs from the manifest": (_set_path("round", value=5), "round"),
    "extra field": (_set_path("tensors", value="../outside.safetensors"), "exactly format, version, round"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_state_json_is_refused_without_calling_anything_by_name(ckpt, case, monkeypatch):
    edit, match = MALFORMED[case]
    _edit_json(ckpt, edit)
    monkeypatch.setattr(np.random, "default_rng", lambda *a: pytest.fail("np.random called by a name from the file"))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_state_is_a_value_error(ckpt, depth):
    body = json.loads((ckpt / "round-1.json").read_text())
    body["state"]["__dict__"]["history"] = "DEEP"
    text = json.dumps(body).replace('"DEEP"', "[" * depth + "]" * depth)
    (ckpt / "round-1.json").write_text(text)
    write_manifest(ckpt / CHECKPOINT_JSON, "fedamole-checkpoint", ("round-1.json", "round-1.safetensors"), {"round": 1})
    with pytest.raises(ValueError, match="nested deeper|not valid JSON"):
        load_checkpoint(ckpt)


def test_manifest_cannot_point_outside_the_folder(ckpt, tmp_path):
    shutil.copy(ckpt / "round-1.json", tmp_path / "outside.json")
    original = (ckpt / CHECKPOINT_JSON).read_text()
    manifest = json.loads(original)
    manifest["files"]["../outside.json"] = manifest["files"].pop("round-1.json")
    (ckpt / CHECKPOINT_JSON).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest_sha256"):
        load_checkpoint(ckpt)
    (ckpt / CHECKPOINT_JSON).write_text(original)
    (ckpt / "round-1.json").unlink()  # a consistent manifest cannot name other files either: names come from round
    (ckpt / "round-1.json").symlink_to(tmp_path / "outside.json")
    with pytest.raises(ValueError, match="not a regular file"):
        load_checkpoint(ckpt)


def test_unreferenced_tensor_and_nan_literal_are_refused(ckpt):
    tensors = load_file(ckpt / "round-1.safetensors")
    save_file({**tensors, "smuggled": torch.zeros(3)}, ckpt / "round-1.safetensors", metadata={"format": "x"})
    write_manifest(ckpt / CHECKPOINT_JSON, "fedamole-checkpoint", ("round-1.json", "round-1.safetensors"), {"round": 1})
    with pytest.raises(ValueError, match="smuggled"):
        load_checkpoint(ckpt)
    save_file(tensors, ckpt / "round-1.safetensors", metadata={"format": "x"})
    text = (ckpt / "round-1.json").read_text().replace('"round": 1', '"round": NaN', 1)
    (ckpt / "round-1.json").write_text(text)
    write_manifest(ckpt / CHECKPOINT_JSON, "fedamole-checkpoint", ("round-1.json", "round-1.safetensors"), {"round": 1})
    with pytest.raises(ValueError, match="NaN"):
        load_checkpoint(ckpt)


def test_non_finite_floats_round_trip_as_strict_json(tmp_path):
    state = {"mean": float("nan"), "hi": float("inf"), "lo": -float("inf"), "x": np.float64("nan"), "n": 1.5}
    save_checkpoint(tmp_path, 1, state)
    json.loads((tmp_path / "round-1.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    _, back = load_checkpoint(tmp_path)
    assert np.isnan(back["mean"]) and np.isnan(back["x"]) and back["hi"] == np.inf and back["lo"] == -np.inf
    assert back["n"] == 1.5


def test_cli_resume_from_a_tampered_checkpoint_exits_2_naming_the_field(one_round, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_round, out / "checkpoint")
    _edit_state(out / "checkpoint", _nan_pool)
    argv = [
        "simulate",
        "--preset",
        "tiny",
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--clients",
        "4",
        "--no-progress",
        "--out",
        str(out),
        "--resume",
    ]
    assert main(argv) == 2
    assert "pool.lora_b: contains NaN" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("algorithm", ["fedamole", "ffa-lora", "fdlora", "local"])
def test_a_genuine_checkpoint_still_resumes(tmp_path, algorithm):
    cfg = {"local_steps": 1, "clients": 4, "algorithm": algorithm}
    simulate(make_config("tiny", {"rounds": 1, **cfg}), progress=False, checkpoint_dir=tmp_path)
    summary = simulate(make_config("tiny", {"rounds": 2, **cfg}), progress=False, checkpoint_dir=tmp_path, resume=True)
    assert [h["round"] for h in summary["history"]] == [1, 2]
