"""Server-side arithmetic: plain / weighted means of client tensors and per-expert means over holders."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["mean_tensors", "mean_states", "expert_mean", "random_scores"]


def mean_tensors(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Plain mean (weights None) or weighted mean of same-shape tensors, in float32."""
    if not tensors:
        raise ValueError("tensors: need at least one tensor to average")
    stacked = torch.stack([t.float() for t in tensors])
    if weights is None:
        return stacked.mean(0)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
    if w.shape != (len(tensors),) or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(tensors)} non-negative numbers with a positive sum, got {weights}")
    return torch.einsum("c,c...->...", w / w.sum(), stacked)


def mean_states(states: Sequence[dict[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Key-wise mean of state dicts that share their keys."""
    if not states:
        raise ValueError("states: need at least one state to average")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"states disagree on keys: {sorted(keys ^ set(s))[:4]}")
    return {k: mean_tensors([s[k] for s in states], weights) for k in states[0]}


def expert_mean(pool: Tensor, held: Sequence[tuple[np.ndarray, Tensor]]) -> Tensor:
    """Per-expert plain mean over the clients that held each expert.

    pool [N_e, ...] (current values; kept for experts nobody held); held: per client (expert ids [k], tensor
    [k, ...] whose row j is that client's copy of expert ids[j]). Returns a new float32 pool.
    """
    total = torch.zeros_like(pool, dtype=torch.float32)
    count = torch.zeros(pool.shape[0], dtype=torch.float32)
    for ids, values in held:
        ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if values.shape[0] != ids_t.numel() or tuple(values.shape[1:]) != tuple(pool.shape[1:]):
            raise ValueError(f"held: expected [{ids_t.numel()}, {list(pool.shape[1:])}], got {list(values.shape)}")
        total.index_add_(0, ids_t, values.float())
        count.index_add_(0, ids_t, torch.ones(ids_t.numel()))
    out = pool.float().clone()
    seen = count > 0
    out[seen] = total[seen] / count[seen].view(-1, *([1] * (pool.dim() - 1)))
    return out


def random_scores(num_experts: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """softmax over clients of U(0, 1) scores: the round-0 (and "random" ablation) input to RSEA."""
    u = rng.random((num_experts, num_clients))
    e = np.exp(u - u.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
