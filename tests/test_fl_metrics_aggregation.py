"""Metrics and the server's aggregation arithmetic."""

import numpy as np
import pytest
import torch

from fedamole.fl.aggregation import expert_mean, mean_states, mean_tensors, random_scores
from fedamole.fl.client import dp_noise, state_nbytes
from fedamole.metrics import accuracy_from_losses, mean_std, rouge_l


def test_accuracy_from_losses():
    losses = [[0.1, 2.0, 3.0], [1.0, 0.5, 0.7], [3.0, 2.0, 1.0], [0.2, 0.1, 0.3]]
    assert accuracy_from_losses(losses, [0, 1, 2, 0]) == 0.75
    with pytest.raises(ValueError, match="labels"):
        accuracy_from_losses(losses, [0, 1, 5, 0])
    with pytest.raises(ValueError, match="losses"):
        accuracy_from_losses([1.0, 2.0], [0, 1])


def test_rouge_l():
    scores = rouge_l(["the cat sat on the mat", "hello"], ["the cat sat on the mat", "goodbye world"])
    assert scores[0] == pytest.approx(1.0) and scores[1] == 0.0
    p = rouge_l(["a b c d"], ["a b x d"])[0]  # LCS 3, precision 3/4, recall 3/4
    assert p == pytest.approx(0.75)
    with pytest.raises(ValueError, match="differ in length"):
        rouge_l(["a"], [])


def test_mean_std():
    assert mean_std([1.0, 3.0, float("nan")]) == (2.0, 1.0)


def test_mean_tensors_plain_and_weighted():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.allclose(mean_tensors([a, b]), torch.tensor([2.0, 4.0]))
    assert torch.allclose(mean_tensors([a, b], [3, 1]), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="weights"):
        mean_tensors([a, b], [0, 0])
    s = mean_states([{"x": a}, {"x": b}])
    assert torch.allclose(s["x"], torch.tensor([2.0, 4.0]))


def test_expert_mean_over_holders():
    pool = torch.arange(4.0).view(4, 1) * 100  # expert 3 held by nobody keeps its value
    held = [
        (np.array([0, 1]), torch.tensor([[1.0], [10.0]])),
        (np.array([1, 2]), torch.tensor([[20.0], [5.0]])),
        (np.array([0, 2]), torch.tensor([[3.0], [7.0]])),
    ]
    out = expert_mean(pool, held)
    assert out.view(-1).tolist() == [2.0, 15.0, 6.0, 300.0]
    with pytest.raises(ValueError, match="held"):
        expert_mean(pool, [(np.array([0]), torch.zeros(2, 1))])


def test_random_scores_are_softmax_over_clients():
    p = random_scores(5, 7, np.random.default_rng(0))
    assert p.shape == (5, 7) and np.allclose(p.sum(1), 1)


def test_dp_noise_norm_and_eta():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(16)
    small = torch.stack([dp_noise(v, 1e4, gen) for _ in range(20)])
    big = torch.stack([dp_noise(v, 0.1, gen) for _ in range(20)])
    assert (small.norm(dim=1) <= v.norm() + 1e-5).all() and (big.norm(dim=1) <= v.norm() + 1e-5).all()
    assert (small - v).norm(dim=1).mean() < (big - v).norm(dim=1).mean()
    with pytest.raises(ValueError, match="dp_eta"):
        dp_noise(v, 0.0, gen)


def test_state_nbytes():
    assert state_nbytes({"a": torch.zeros(3, 4), "b": {"c": np.zeros(5, dtype=np.int32)}}) == 48 + 20
