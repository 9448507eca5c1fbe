"""The authors' DP mechanism on the uploaded statistics, and the PEFT prompt-learning baselines (SPEC §3)."""

import dataclasses

import numpy as np
import pytest
import torch

from fedamole.fl.client import client_update, embedding_stats
from fedamole.fl.dp import clip_rows, example_norm_bounds, gamma_uniform_moments, gamma_uniform_noise, privatize_stats
from fedamole.fl.prompt_baselines import adapter_state_dict, load_adapter_state_dict, prompt_init_text
from fedamole.fl.protocol import ClientResult
from fedamole.simulation.presets import (
    ByteTokenizer,
    build_data,
    build_workload,
    make_algorithm,
    make_config,
    mole_config,
)
from fedamole.simulation.runner import simulate


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _built(algorithm, **over):
    cfg = make_config("tiny", {"algorithm": algorithm, **over})
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return cfg, scenario, algo, workload


# -- DP ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,eta", [(8, 10.0), (4, 100.0)])
def test_gamma_uniform_noise_moments(dim, eta):
    """1.6 M draws: mean, E|X|, E X^2 and E X^4 within a few standard errors of the closed form of
    Gamma(shape = dim, rate = eta) x U(-1, 1) (a rate/scale mix-up or a wrong shape is off by far more)."""
    x = gamma_uniform_noise((1_600_000 // dim, dim), eta, np.random.default_rng(1234)).double().reshape(-1)
    m = gamma_uniform_moments(dim, eta)
    n = x.numel()
    assert abs(float(x.mean())) < 5 * (m["var"] / n) ** 0.5
    assert float(x.abs().mean()) == pytest.approx(m["abs_mean"], rel=0.005)
    assert float((x**2).mean()) == pytest.approx(m["var"], rel=0.01)
    assert float((x**4).mean()) == pytest.approx(m["fourth"], rel=0.03)
    with pytest.raises(ValueError, match="dp_eta"):
        gamma_uniform_noise((3, 2), 0.0, np.random.default_rng(0))


def test_clip_rows():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(x, torch.tensor(1.0))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    out = clip_rows(x, torch.tensor([10.0, 0.25]))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([5.0, 0.25]))


def test_gamma_uniform_privatized_stats_are_clipped_to_per_example_bounds():
    """Bounds: the largest per-example statistic norm (>= the norm of the overall mean, a convex combination of
    the per-example means); little noise leaves the statistics (almost) as they are, much noise is clipped to the
    bound; the draws are fixed by the seed."""
    _, scenario, algo, workload = _built("fedamole")
    from fedamole.fl.client import load_state

    load_state(workload.model, algo.payloads(1)[0].down)
    examples = scenario.clients[0].embed or scenario.clients[0].train
    stats = embedding_stats(workload, examples)
    bounds = example_norm_bounds(workload, examples)
    for name, t in stats.t.items():
        assert float(t.norm()) <= float(bounds["t"][name]) + 1e-5
        assert (stats.e[name].norm(dim=1) <= bounds["e"][name] + 1e-5).all()
    quiet = privatize_stats(workload, stats, examples, "gamma-uniform", 1e9, seed=0)
    loud = privatize_stats(workload, stats, examples, "gamma-uniform", 1e-2, seed=0)
    again = privatize_stats(workload, stats, examples, "gamma-uniform", 1e-2, seed=0)
    for name in stats.t:
        torch.testing.assert_close(quiet.t[name], stats.t[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loud.t[name].norm(), bounds["t"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loud.e[name].norm(dim=1), bounds["e"][name], rtol=1e-5, atol=1e-6)
        assert torch.equal(loud.e[name], again.e[name])
    with pytest.raises(ValueError, match="dp_mechanism"):
        privatize_stats(workload, stats, examples, "laplace", 1.0, seed=0)


def test_dp_mechanism_config_and_run():
    cfg = make_config("tiny", {"rounds": 1, "local_steps": 1, "fedamole": {"dp_eta": 50.0}})
    assert cfg.fedamole["dp_mechanism"] == "gamma-uniform"
    s = simulate(cfg, progress=False)
    assert np.isfinite(s["final_mean"])
    with pytest.raises(ValueError, match="fedamole.dp_mechanism"):
        make_config("tiny", {"fedamole": {"dp_mechanism": "laplace"}})


# -- prompt baselines ---------------------------------------------------------------------------------------------
def test_fedprompt_initialises_from_the_init_text_and_trains_only_the_prompt():
    cfg, scenario, algo, workload = _built("fedprompt")
    text = prompt_init_text(scenario.name)
    ids = ByteTokenizer().encode(text)
    assert list(algo.glob) == ["prompt_encoder.default.embedding.weight"]
    emb = algo.glob["prompt_encoder.default.embedding.weight"]
    words = workload.model.get_input_embeddings().weight[torch.tensor(ids)]
    assert emb.shape == (len(ids), 32) and torch.equal(emb, words.detach().float())
    payload = dataclasses.replace(algo.payloads(1)[0], steps=3, lr=1e-2, batch_size=2)
    backbone = {k: v.clone() for k, v in workload.model.named_parameters() if not v.requires_grad}
    up = client_update(workload, payload, scenario.clients[0], seed=3, choices=scenario.choices)
    assert set(up.up) == set(algo.glob) and not torch.equal(up.up[next(iter(algo.glob))], emb)
    assert all(torch.equal(v, dict(workload.model.named_parameters())[k]) for k, v in backbone.items())
    assert np.isfinite(up.train_loss)


def test_prompt_loss_equals_peft_own_loss():
    """Our response-only loss on a prompt model (its logits start with the virtual tokens) equals PEFT's own loss
    with the same labels (PEFT pads the virtual positions with -100)."""
    for algorithm in ("fedprompt", "fedptuning"):
        _, scenario, _, workload = _built(algorithm)
        batch = workload.collate(scenario.clients[0].train[:3])
        with torch.no_grad():
            ours = workload.task_loss(batch)
            theirs = workload.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fedptuning_state_and_plain_mean():
    _, _, algo, workload = _built("fedptuning", baselines={"prompt_tokens": 5, "ptuning_hidden": 7})
    keys = sorted(algo.glob)
    assert keys[0] == "prompt_encoder.default.embedding.weight" and algo.glob[keys[0]].shape == (5, 32)
    assert any(".mlp_head." in k and 7 in algo.glob[k].shape for k in keys)
    before = {k: v.clone() for k, v in algo.glob.items()}
    payloads = algo.payloads(1)
    algo.aggregate(
        1, [ClientResult(up={k: before[k] + c for k in p.upload}, private={}) for c, p in enumerate(payloads)]
    )
    for k in keys:
        torch.testing.assert_close(algo.glob[k], before[k] + 1.5)
    state = adapter_state_dict(workload.model)
    assert sorted(state) == keys
    load_adapter_state_dict(workload.model, {k: v + 1 for k, v in algo.glob.items()})
    assert torch.equal(adapter_state_dict(workload.model)[keys[0]], algo.glob[keys[0]] + 1)
    with pytest.raises(ValueError, match="prompt encoder"):
        load_adapter_state_dict(workload.model, {})


def test_prompt_baselines_need_a_causal_lm():
    cfg = make_config("default", {"algorithm": "fedprompt", "clients": 2, "rounds": 1, "data": {"max_per_client": 20}})
    with pytest.raises(ValueError, match="causal LM"):
        simulate(cfg, progress=False)


def test_fedprompt_ft_resumes(tmp_path):
    cfg = make_config("tiny", {"algorithm": "fedprompt-ft", "rounds": 2, "local_steps": 2, "eval_initial": False})
    full = simulate(cfg, progress=False)
    simulate(
        make_config("tiny", {"algorithm": "fedprompt-ft", "rounds": 1, "local_steps": 2, "eval_initial": False}),
        progress=False,
        checkpoint_dir=tmp_path,
    )
    resumed = simulate(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
