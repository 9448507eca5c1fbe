"""`Algorithm.state_dict` / `load_state_dict`: every algorithm saves exactly its server state and restores it all or
nothing (a checkpoint restore no longer overwrites the object's attributes wholesale)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fedamole.fl.algorithm import Algorithm
from fedamole.fl.protocol import ClientResult, EmbeddingStats
from fedamole.manifest import write_manifest
from fedamole.simulation.checkpoint import CHECKPOINT_JSON, load_checkpoint, save_checkpoint
from fedamole.simulation.presets import build_data, build_workload, make_algorithm, make_config, mole_config

STATES = {
    "fedamole": ("modules", "extra", "history_assign", "rng"),
    "fedit": ("glob", "private"),
    "local": ("glob", "private"),
    "ffa-lora": ("glob", "private"),
    "fdlora": ("glob", "momentum", "private"),
    "fedprompt": ("glob", "private"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workloads():
    """One tiny workload per model kind (MoLE with one LoRA slot, MoLE with experts, a prompt model)."""
    return {}


def _set_up(name: str, workloads: dict) -> Algorithm:
    cfg = make_config("tiny", {"algorithm": name})
    algo = make_algorithm(cfg)
    model_config = algo.mole_config(mole_config(cfg))
    key = (name == "fedprompt", model_config.num_experts)
    if key not in workloads:
        scenario = build_data(cfg)
        workloads[key] = scenario, build_workload(cfg, model_config, scenario)
    scenario, workload = workloads[key]
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return algo


def _leaves(tree, path="state"):
    """(path, leaf) pairs of a nested state, for comparing two states exactly."""
    if isinstance(tree, dict):
        return [pair for k in sorted(tree) for pair in _leaves(tree[k], f"{path}.{k}")]
    if isinstance(tree, (list, tuple)):
        return [pair for i, v in enumerate(tree) for pair in _leaves(v, f"{path}.{i}")]
    if isinstance(tree, np.random.Generator):
        return [(path, json.dumps(tree.bit_generator.state))]
    return [(path, tree)]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), path
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y), path
        else:
            assert x == y, path


def _one_round(algo: Algorithm) -> None:
    """A round of made-up uploads (every client's state moved by its index), so that the state is not the initial
    one; statistics are e = t = one-hot per client."""
    uploads = []
    for c, task in enumerate(algo.payloads(1)):
        up = {k: v.clone() + 0.1 * (c + 1) for k, v in task.down.items() if k in task.upload}
        private = {k: ({**task.private, **task.down}[k].clone() + c) for k in task.keep}
        stats = None
        if task.stats:
            r = next(iter(task.down.values())).shape[1]
            t = {n: torch.eye(r)[c % r] for n in task.expert_ids}
            e = {n: torch.eye(r)[c % r].expand(len(ids), r).clone() for n, ids in task.expert_ids.items()}
            stats = EmbeddingStats(t=t, e=e)
        uploads.append(ClientResult(up=up, private=private, stats=stats))
    algo.aggregate(1, uploads)


@pytest.mark.parametrize("name", sorted(STATES))
def test_state_round_trips_into_a_fresh_algorithm(name, workloads):
    trained = _set_up(name, workloads)
    assert tuple(trained.state_dict()) == STATES[name]
    _one_round(trained)
    fresh = _set_up(name, workloads)
    with pytest.raises(AssertionError):  # the made-up round changed the state: the round trip below means something
        _assert_same(fresh.state_dict(), trained.state_dict())
    fresh.load_state_dict(trained.state_dict())
    _assert_same(fresh.state_dict(), trained.state_dict())
    for a, b in zip(fresh.payloads(2), trained.payloads(2)):  # what the clients get next is the same
        _assert_same(
            {"down": a.down, "private": a.private, "ids": a.expert_ids or {}},
            {"down": b.down, "private": b.private, "ids": b.expert_ids or {}},
        )


@pytest.mark.parametrize("name", ["fedamole", "fedit", "fdlora"])
def test_missing_or_extra_keys_are_refused_naming_them(name, workloads):
    algo = _set_up(name, workloads)
    state = algo.state_dict()
    first = STATES[name][0]
    missing = {k: v for k, v in state.items() if k != first}
    with pytest.raises(ValueError, match=rf"load_state_dict: .*missing keys \['{first}'\], unexpected keys \[\]"):
        algo.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['num_experts'\]"):
        algo.load_state_dict({**state, "num_experts": 30})
    with pytest.raises(ValueError, match="must be a mapping"):
        algo.load_state_dict([state])
    _assert_same(algo.state_dict(), state)  # nothing was changed by the refused states


def test_a_state_breaking_an_invariant_is_refused_and_the_old_state_kept(workloads):
    algo = _set_up("fedamole", workloads)
    state = algo.state_dict()
    module = next(iter(state["modules"]))
    bad_modules = {n: {**m, "assign": np.ones_like(m["assign"])} for n, m in state["modules"].items()}
    with pytest.raises(ValueError, match=re.escape(f"modules[{module!r}].assign: every expert needs exactly")):
        algo.load_state_dict({**state, "modules": bad_modules})
    assert algo.modules is state["modules"]


@pytest.mark.parametrize(
    "name, edit, match",
    [
        ("fedit", lambda s: {**s, "glob": {**s["glob"], "x.lora_a": torch.zeros(1)}}, r"glob: unexpected keys"),
        ("ffa-lora", lambda s: {**s, "private": s["private"][:-1]}, r"private must be a list of 4"),
        ("local", lambda s: {**s, "private": [*s["private"][:-1], {"y": torch.zeros(1)}]}, r"private\[3\]"),
        ("fdlora", lambda s: {**s, "momentum": dict(list(s["momentum"].items())[1:])}, r"momentum: .*missing keys"),
    ],
)
def test_baseline_states_are_checked(name, edit, match, workloads):
    algo = _set_up(name, workloads)
    with pytest.raises(ValueError, match=match):
        algo.load_state_dict(edit(algo.state_dict()))


def test_a_checkpoint_of_another_format_version_is_refused_clearly(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": 1})
    path = tmp_path / "round-1.json"
    body = json.loads(path.read_text())
    body["version"] = 2
    path.write_text(json.dumps(body))
    write_manifest(
        tmp_path / CHECKPOINT_JSON, "fedamole-checkpoint", ("round-1.json", "round-1.safetensors"), {"round": 1}
    )
    with pytest.raises(ValueError, match="checkpoint format version 2, this fedamole reads version 3"):
        load_checkpoint(tmp_path)
