"""The authors' baseline protocol (SPEC §3): plain-mean FedAvg, FDLoRA (outer Nesterov step, private refresh,
AdaFusion, AdamW), the static-homogeneous ablation and k_c for the scalability runs."""

import numpy as np
import pytest
import torch

from fedamole.fl.baselines import LoRABaseline
from fedamole.fl.client import client_update
from fedamole.fl.fdlora import (
    FDLoRA,
    FusionRequest,
    adafusion,
    fuse_states,
    fusion_penalty,
    nesterov_outer_step,
    search_fusion_weights,
)
from fedamole.fl.fedamole_algo import FedAMoLE
from fedamole.fl.protocol import ClientResult, ClientTask
from fedamole.simulation.checkpoint import load_checkpoint
from fedamole.simulation.presets import build_data, build_workload, make_algorithm, make_config, mole_config
from fedamole.simulation.runner import simulate


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**over):
    return make_config("tiny", over)


def _built(algorithm):
    cfg = _tiny(algorithm=algorithm)
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return cfg, scenario, algo, workload


@pytest.fixture(scope="module")
def fdlora_setup():
    return _built("fdlora")


# -- FedAvg: the authors' plain mean ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedit", "fedit-ft", "ffa-lora"])
def test_fedavg_baselines_use_a_plain_mean_by_default(fdlora_setup, name):
    """Clients with 1, 1, 1 and 97 training examples upload init + c: the plain mean is init + 1.5 whatever the
    sizes; aggregation="weighted" gives the size-weighted mean instead."""
    _, _, _, workload = fdlora_setup
    assert make_algorithm(_tiny(algorithm=name)).aggregation == "mean"
    sizes = [1, 1, 1, 97]
    for aggregation, expected in (("mean", 1.5), ("weighted", (0 + 1 + 2 + 3 * 97) / 100)):
        algo = LoRABaseline(name, aggregation=aggregation)
        algo.setup(workload.model, sizes, seed=0)
        before = {k: v.clone() for k, v in algo.glob.items()}
        payloads = algo.payloads(1)
        uploads = [ClientResult(up={k: before[k] + c for k in p.upload}, private={}) for c, p in enumerate(payloads)]
        algo.aggregate(1, uploads)
        for k in payloads[0].upload:
            assert torch.allclose(algo.glob[k], before[k] + expected), (aggregation, k)
    with pytest.raises(ValueError, match="aggregation"):
        LoRABaseline("fedit", aggregation="median")


# -- FDLoRA ----------------------------------------------------------------------------------------------------
def test_outer_step_is_torch_sgd_nesterov():
    """Three outer steps on known client means equal torch.optim.SGD(lr, momentum, nesterov=True) with the
    gradient global - mean."""
    gen = torch.Generator().manual_seed(0)
    glob = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    means = [{k: v + torch.randn(v.shape, generator=gen) for k, v in glob.items()} for _ in range(3)]
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in glob.items()}
    opt = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=0.5, nesterov=True)
    momentum = {k: torch.zeros_like(v) for k, v in glob.items()}
    ours = dict(glob)
    for mean in means:
        opt.zero_grad()
        for k, p in ref.items():
            p.grad = p.detach() - mean[k]
        opt.step()
        ours, momentum = nesterov_outer_step(ours, mean, momentum, lr=0.7, mu=0.5)
        for k in glob:
            torch.testing.assert_close(ours[k], ref[k].detach(), rtol=1e-6, atol=1e-6)
    # The first step moves by (1 + mu) x the mean update (PyTorch's buffer starts at the first gradient).
    one, _ = nesterov_outer_step(glob, means[0], {k: torch.zeros_like(v) for k, v in glob.items()}, 1.0, 0.5)
    torch.testing.assert_close(one["a"], glob["a"] + 1.5 * (means[0]["a"] - glob["a"]))


def test_fdlora_refresh_cadence_and_server_state(fdlora_setup):
    """Round 1 is the warm-up (plain mean, no private copy); the private copies are refreshed in the authors'
    rounds 0, 5, 10 (our rounds 2, 7, 12) and only from what the clients kept."""
    _, _, _, workload = fdlora_setup
    algo = FDLoRA(sync_every=5)
    algo.setup(workload.model, [5] * 4, seed=0)
    assert [r for r in range(1, 14) if algo.refreshes_private(r)] == [2, 7, 12]
    no_warmup = FDLoRA(sync_every=5, warmup_round=False)
    assert [r for r in range(1, 12) if no_warmup.refreshes_private(r)] == [1, 6, 11]
    init = {k: v.clone() for k, v in algo.glob.items()}
    for r in range(1, 7):
        payloads = algo.payloads(r)
        assert all(p.optimizer == "adamw" and p.down.keys() == init.keys() for p in payloads)
        assert all(bool(p.keep) == algo.refreshes_private(r) for p in payloads)
        ups = [{k: algo.glob[k] + 0.1 * (c + 1) * r for k in p.upload} for c, p in enumerate(payloads)]
        uploads = [ClientResult(up=u, private={k: u[k] for k in p.keep}) for u, p in zip(ups, payloads)]
        glob_before = {k: v.clone() for k, v in algo.glob.items()}
        algo.aggregate(r, uploads)
        if r == 1:
            assert all(p is None for p in algo.private)
            for k in init:  # warm-up: the plain mean of the uploads (offsets 0.1 .. 0.4)
                torch.testing.assert_close(algo.glob[k], init[k] + 0.25)
            assert all(bool(algo.eval_payloads()[c].fusion is None) for c in range(4))
        else:
            assert algo.glob.keys() == init.keys() and not torch.equal(algo.glob[k], glob_before[k])
        if r == 2:
            refreshed = {c: {k: v.clone() for k, v in algo.private[c].items()} for c in range(4)}
            for c in range(4):
                torch.testing.assert_close(algo.private[c][k], ups[c][k])
    for c in range(4):  # rounds 3..6 kept nothing: the round-2 copies are still there
        assert all(torch.equal(algo.private[c][k], refreshed[c][k]) for k in refreshed[c])
    request = algo.eval_payloads()[1].fusion
    assert isinstance(request, FusionRequest) and (request.budget, request.bound, request.penalty) == (5, 1.5, 0.05)


def test_fusion_search_respects_bounds_and_penalty():
    asked = []
    target = np.array([1.0, -0.4])

    def objective(w):
        asked.append(w.copy())
        return float(((w - target) ** 2).sum()) + fusion_penalty(w, 0.05)

    best, value, history = search_fusion_weights(objective, budget=8, bound=1.5, seed=3)
    assert len(history) == len(asked) == 8
    assert np.array_equal(history[0][0], np.zeros(2))  # starts at w = 0, as the authors' init
    assert all(np.all(np.abs(w) <= 1.5 + 1e-12) for w in asked)
    assert value == min(v for _, v in history) and value < history[0][1]
    assert np.linalg.norm(best - target) < np.linalg.norm(target)
    assert fusion_penalty(np.array([1.0, -0.5]), 0.05) == pytest.approx(0.05 * 0.75)
    # An objective whose optimum lies outside the box: no candidate leaves it.
    asked.clear()
    target = np.array([5.0, -5.0])
    best, _, _ = search_fusion_weights(objective, budget=6, bound=1.5, seed=0)
    assert all(np.all(np.abs(w) <= 1.5 + 1e-12) for w in asked)
    with pytest.raises(ValueError, match="budget"):
        search_fusion_weights(objective, budget=0)


def test_adafusion_improves_the_loss_and_loads_the_fused_state(fdlora_setup):
    """Global = the untrained LoRA (B = 0), private = a LoRA trained on this client's data: the fused model's
    held-out loss is no worse than w = (0, 0)'s (the base model), and the model holds w0 g + w1 p."""
    cfg, scenario, algo, workload = fdlora_setup
    data = scenario.clients[0]
    glob = {k: v.clone() for k, v in algo.glob.items()}
    payload = ClientTask(
        down=glob,
        upload=tuple(glob),
        keep=tuple(glob),
        steps=30,
        lr=3e-2,
        batch_size=4,
        evaluate=False,
        stats=False,
        optimizer="adamw",
    )
    private = client_update(workload, payload, data, seed=1, choices=scenario.choices).private
    request = FusionRequest(private, budget=6, batches=2)
    batches = list(workload.batches(data.embed or data.train, 4, steps=2, rng=np.random.default_rng(7)))

    def score(weights):
        from fedamole.fl.client import load_state

        load_state(workload.model, fuse_states(weights, [glob, private]))
        workload.model.eval()
        with torch.no_grad():
            return float(np.mean([float(workload.task_loss(b)) for b in batches])) + fusion_penalty(weights, 0.05)

    base, trained = score([0.0, 0.0]), score([0.0, 1.0])
    assert trained < base  # the private LoRA helps on this client's held-out data
    weights = adafusion(workload, glob, request, data.embed or data.train, 4, seed=7)
    assert np.all(np.abs(weights) <= 1.5)
    fused = fuse_states(weights, [glob, private])
    from fedamole.fl.client import extract_state

    now = extract_state(workload.model, list(fused), fused)
    for k in fused:
        torch.testing.assert_close(now[k], fused[k])
    assert score(weights) <= base
    with pytest.raises(ValueError, match="keys"):
        adafusion(workload, glob, FusionRequest({}), data.train, 4, seed=0)


def test_fdlora_fuses_and_resumes_like_an_uninterrupted_run(tmp_path):
    """3 rounds straight == 2 rounds, stop, resume to 3 (momentum and private copies come back from the
    checkpoint); the scored rounds after the warm-up use AdaFusion."""
    cfg = _tiny(algorithm="fdlora", rounds=3, local_steps=2, eval_initial=False)
    full = simulate(cfg, progress=False, checkpoint_dir=tmp_path / "full")
    simulate(
        _tiny(algorithm="fdlora", rounds=2, local_steps=2, eval_initial=False),
        progress=False,
        checkpoint_dir=tmp_path / "cut",
    )
    resumed = simulate(cfg, progress=False, checkpoint_dir=tmp_path / "cut", resume=True)
    assert [h["per_client"] for h in resumed["history"]] == [h["per_client"] for h in full["history"]]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    (_, a), (_, b) = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    a, b = a["algorithm"], b["algorithm"]
    assert any(bool(v.abs().sum() > 0) for v in a["momentum"].values())
    for part in ("glob", "momentum"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(p is not None for p in a["private"])
    assert all(torch.equal(pa[k], pb[k]) for pa, pb in zip(a["private"], b["private"]) for k in pa)


def test_prompt_baselines_give_the_same_results_on_the_cohort_engine():
    """Prompt models are not cohort-stackable: their clients take the sequential path, with the same results.
    (FDLoRA's AdamW cohorts are compared with the sequential engine in tests/test_engine_cohort.py.)"""
    seq = simulate(_tiny(algorithm="fedprompt-ft", local_steps=2), progress=False)
    coh = simulate(_tiny(algorithm="fedprompt-ft", local_steps=2, engine="cohort"), progress=False)
    assert [h["per_client"] for h in coh["history"]] == [h["per_client"] for h in seq["history"]]
    assert [h["train_loss"] for h in coh["history"]] == [h["train_loss"] for h in seq["history"]]


# -- FedAMoLE ablation and scalability setting -------------------------------------------------------------------
def test_static_homogeneous_keeps_an_equal_random_assignment(fdlora_setup):
    _, _, _, workload = fdlora_setup
    algo = FedAMoLE(num_experts=8, clients_per_expert=2, min_experts=2, max_experts=4, assignment="static-homogeneous")
    algo.setup(workload.model, [10] * 4, seed=0)
    first = {n: m["assign"].copy() for n, m in algo.modules.items()}
    for r in (1, 2):
        payloads = algo.payloads(r)
        assert not any(p.stats for p in payloads)  # no statistics needed, none uploaded
        uploads = [ClientResult(up={k: v.clone() for k, v in p.down.items()}, stats=None) for p in payloads]
        algo.aggregate(r, uploads)
    for n, m in algo.modules.items():
        assert np.array_equal(m["assign"], first[n])
        assert m["assign"].sum(0).tolist() == [4, 4, 4, 4]
    s = simulate(_tiny(algorithm="fedamole-static-homo", rounds=2, local_steps=1), progress=False)
    assert [h["experts_per_client_mean"] for h in s["history"]] == [[4.0] * 4, [4.0] * 4]


def test_clients_per_expert_is_four_from_twenty_clients():
    for clients, k_c in ((10, 2), (19, 2), (20, 4), (50, 4)):
        cfg = make_config("snli", {"clients": clients})
        assert cfg.fedamole["clients_per_expert"] is None
        algo = make_algorithm(cfg)
        assert algo.k_c == k_c and algo.num_experts == 30
    assert make_algorithm(make_config("snli", {"clients": 40, "fedamole": {"clients_per_expert": 3}})).k_c == 3
