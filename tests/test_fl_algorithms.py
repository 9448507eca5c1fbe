"""FedAMoLE server/client and the baselines on the `tiny` preset (random-init tiny Llama, synthetic data)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedamole.fl.client import client_update, extract_state, load_state
from fedamole.fl.fedamole_algo import FedAMoLE
from fedamole.fl.protocol import ClientResult, EmbeddingStats
from fedamole.simulation.presets import ALGORITHMS, build_data, build_workload, make_algorithm, make_config, mole_config
from fedamole.simulation.runner import simulate


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**over):
    over.setdefault("mole", {})
    return make_config("tiny", over)


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = _tiny()
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return cfg, scenario, algo, workload


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_two_rounds(algorithm):
    s = simulate(_tiny(algorithm=algorithm, local_steps=2), progress=False)
    assert [h["round"] for h in s["history"]] == [1, 2]
    assert len(s["final_per_client"]) == 4 and 0.0 <= s["final_mean"] <= 1.0
    for h in s["history"]:
        assert np.isfinite(h["train_loss"])
        if algorithm == "local":
            assert h["bytes_up"] == 0 and h["bytes_down"] == 0
        else:
            assert h["bytes_up"] > 0 and h["bytes_down"] > 0
    json.dumps(s)


def test_load_extract_state_sets_slots(tiny_setup):
    _, _, algo, workload = tiny_setup
    payload = algo.payloads(1)[0]
    load_state(workload.model, payload.down)
    for name, ids in payload.expert_ids.items():
        module = dict(workload.model.named_modules())[name]
        assert int(module.active_experts.sum()) == len(ids)
        assert not module.active_experts[len(ids) :].any()
    back = extract_state(workload.model, list(payload.down), payload.down)
    for k, v in payload.down.items():
        assert torch.equal(back[k], v.to(back[k].dtype)), k


def test_client_update_is_a_function_of_its_inputs(tiny_setup):
    cfg, scenario, algo, workload = tiny_setup
    payload = dataclasses.replace(algo.payloads(1)[1], steps=2, lr=1e-3, batch_size=2)
    a = client_update(workload, payload, scenario.clients[1], seed=5, choices=scenario.choices)
    b = client_update(workload, payload, scenario.clients[1], seed=5, choices=scenario.choices)
    for k in a.up:
        assert torch.equal(a.up[k], b.up[k])
    assert a.metric == b.metric
    changed = [k for k in a.up if not torch.equal(a.up[k], payload.down[k].to(a.up[k].dtype))]
    assert any(k.endswith("lora_b") for k in changed) and any(k.endswith("router") for k in changed)
    assert set(a.stats.t) == set(payload.expert_ids)
    name, ids = next(iter(payload.expert_ids.items()))
    assert a.stats.e[name].shape == (len(ids), 4) and a.stats.t[name].shape == (4,)


def test_fedamole_aggregation_and_reverse_selection(tiny_setup):
    """Per-expert plain means over holders; clients with distinct (orthogonal) data get the experts aligned with
    them."""
    _, _, _, workload = tiny_setup
    algo = FedAMoLE(num_experts=8, clients_per_expert=1, min_experts=2, max_experts=4)
    algo.setup(workload.model, [10, 10, 10, 10], seed=0)
    payloads = algo.payloads(1)
    home = np.arange(8) // 2  # experts 2c, 2c+1 belong to client c
    uploads = []
    for c, p in enumerate(payloads):
        up = {k: v.clone() + c for k, v in p.down.items()}
        t = {n: torch.eye(4)[c] * 4.0 for n in p.expert_ids}
        e = {n: torch.stack([torch.eye(4)[home[i]] * 4.0 for i in ids]) for n, ids in p.expert_ids.items()}
        uploads.append(ClientResult(up=up, stats=EmbeddingStats(t=t, e=e)))
    name = next(iter(algo.modules))
    before = {k: v.clone() for k, v in algo.modules[name]["pool"].items()}
    assign = algo.modules[name]["assign"].copy()
    algo.aggregate(1, uploads)
    pool = algo.modules[name]["pool"]
    for i in range(8):
        holders = np.flatnonzero(assign[i])
        assert torch.allclose(pool["lora_a"][i], before["lora_a"][i] + holders.mean())
    assert torch.allclose(pool["router"], before["router"] + 1.5)  # mean of client offsets 0..3
    new = algo.modules[name]["assign"]
    for c in range(4):
        assert set(np.flatnonzero(new[:, c])) == {2 * c, 2 * c + 1}


def test_fedamole_feasibility_and_homogeneous_errors(tiny_setup):
    _, _, _, workload = tiny_setup
    with pytest.raises(ValueError, match="8 x 2 = 16 > clients x max_experts = 3 x 4"):
        FedAMoLE(num_experts=8, max_experts=4).setup(workload.model, [5, 5, 5], 0)
    with pytest.raises(ValueError, match="divisible"):
        FedAMoLE(num_experts=7, max_experts=4, assignment="homogeneous").setup(workload.model, [5] * 4, 0)
    with pytest.raises(ValueError, match="assignment"):
        FedAMoLE(assignment="greedy")


def test_homogeneous_and_dp_noise():
    s = simulate(_tiny(algorithm="fedamole-homo", rounds=1, local_steps=1), progress=False)
    assert s["history"][0]["experts_per_client_mean"] == [4.0, 4.0, 4.0, 4.0]
    s = simulate(_tiny(rounds=1, local_steps=1, fedamole={"dp_eta": 10.0}), progress=False)
    assert np.isfinite(s["final_mean"])


def test_generation_scenario_rouge():
    cfg = _tiny(
        clients=3,
        rounds=1,
        local_steps=1,
        data={"source": "synthetic-gen", "n_per_task": 12},
        fedamole={"num_experts": 6, "clients_per_expert": 1, "min_experts": 2, "max_experts": 4},
    )
    s = simulate(cfg, progress=False)
    assert s["metric"] == "rouge_l" and 0.0 <= s["final_mean"] <= 1.0


def test_default_preset_sequence_classifier_smoke():
    cfg = make_config(
        "default",
        {
            "clients": 2,
            "rounds": 1,
            "local_steps": 1,
            "batch_size": 4,
            "threads": 1,
            "data": {"max_per_client": 40},
            "fedamole": {"num_experts": 4, "clients_per_expert": 1, "max_experts": 2},
        },
    )
    s = simulate(cfg, progress=False)
    assert s["metric"] == "accuracy" and s["chance"] == 1 / 8 and len(s["final_per_client"]) == 2
