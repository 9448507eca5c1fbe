"""RSEA: optimality against brute force, constraints at scale, input validation and infeasibility errors."""

import itertools

import numpy as np
import pytest

from fedamole.fl.rsea import assign_experts, score_matrix


def _brute_force(p, k, lo, hi):
    n_e, c = p.shape
    best = -np.inf
    choices = list(itertools.combinations(range(c), k))
    for combo in itertools.product(choices, repeat=n_e):
        load = np.zeros(c, dtype=int)
        for cl in combo:
            load[list(cl)] += 1
        if load.min() < lo or load.max() > hi:
            continue
        best = max(best, sum(p[i, list(cl)].sum() for i, cl in enumerate(combo)))
    return best


def _check(x, k, lo, hi):
    assert x.dtype == bool
    assert (x.sum(1) == k).all()
    assert (x.sum(0) >= lo).all() and (x.sum(0) <= hi).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_e,c,k,lo,hi", [(4, 3, 2, 2, 3), (4, 4, 2, 1, 3), (3, 4, 2, 1, 2), (4, 4, 1, 1, 1)])
def test_matches_brute_force(seed, n_e, c, k, lo, hi):
    p = np.random.default_rng(seed).random((n_e, c))
    x = assign_experts(p, k, lo, hi)
    _check(x, k, lo, hi)
    assert np.isclose((p * x).sum(), _brute_force(p, k, lo, hi))


def test_constraints_at_scale_and_softmax_scores():
    rng = np.random.default_rng(1)
    e, t = rng.normal(size=(100, 8)), rng.normal(size=(200, 8))
    p = score_matrix(e, t)
    assert np.allclose(p.sum(1), 1.0)
    x = assign_experts(p, clients_per_expert=4, min_experts=2, max_experts=8)
    _check(x, 4, 2, 8)


def test_reference_defaults():
    p = np.random.default_rng(0).random((30, 10))
    _check(assign_experts(p), 2, 2, 8)


def test_prefers_high_scores():
    p = np.full((6, 3), 0.01)
    p[0:2, 0] = p[2:4, 1] = p[4:6, 2] = 1.0
    x = assign_experts(p, clients_per_expert=1, min_experts=2, max_experts=2)
    assert x[0:2, 0].all() and x[2:4, 1].all() and x[4:6, 2].all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"clients_per_expert": 2, "min_experts": 2, "max_experts": 3},
            r"30 x 2 = 60 > clients x max_experts = 10 x 3",
        ),
        (
            {"clients_per_expert": 1, "min_experts": 4, "max_experts": 8},
            r"30 x 1 = 30 < clients x min_experts = 10 x 4",
        ),
        ({"clients_per_expert": 11}, r"clients_per_expert \(11\) > number of clients \(10\)"),
        ({"min_experts": 5, "max_experts": 4}, r"min_experts \(5\) must be <= max_experts \(4\)"),
    ],
)
def test_infeasible_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_experts(np.ones((30, 10)), **kwargs)


@pytest.mark.parametrize(
    "scores,kwargs,match",
    [
        (np.ones(5), {}, "2-D"),
        (np.ones((0, 3)), {}, "non-empty"),
        (np.array([[1.0, np.nan], [0, 1]]), {}, "finite"),
        (np.ones((2, 2)), {"clients_per_expert": 0}, "clients_per_expert"),
        (np.ones((2, 2)), {"min_experts": 1.5}, "min_experts"),
        (np.ones((2, 2)), {"max_experts": True}, "max_experts"),
    ],
)
def test_bad_inputs(scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_experts(scores, **kwargs)


def test_distinct_clients_get_distinct_experts():
    """Experts whose embeddings align with one client's token embedding are sent to that client."""
    rng = np.random.default_rng(0)
    clients = np.eye(4) * 5.0  # four clients with orthogonal token embeddings
    experts = np.repeat(clients, 3, axis=0) + rng.normal(scale=0.05, size=(12, 4))  # 3 experts aligned per client
    x = assign_experts(score_matrix(experts, clients), clients_per_expert=1, min_experts=3, max_experts=3)
    for c in range(4):
        assert set(np.flatnonzero(x[:, c])) == {3 * c, 3 * c + 1, 3 * c + 2}
