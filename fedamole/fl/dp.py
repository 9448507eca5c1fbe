"""Noise on the embedding statistics a FedAMoLE client uploads (t_c and e_{c,i}, SPEC §3 steps 4-5).

Mechanisms (``fedamole.dp_mechanism``):

* ``"gamma-uniform"`` — the authors' mechanism (their ``sample_noise``): every coordinate of a statistic of
  dimension d (the LoRA rank r) gets independent noise G x U with G ~ Gamma(shape = d, rate = eta) and
  U ~ Uniform(-1, 1); then each noisy vector (t_c, and each expert's row of e_c) is rescaled to at most its
  clipping bound, the largest norm that statistic takes on a single example of the embedding set (the authors
  track the largest per-batch value; with their batch size 1 that is per example). Larger eta = less noise.
* ``"metric-sphere"`` — metric-DP: v + rho u with rho ~ Gamma(d, rate eta) and u uniform on the unit sphere,
  rescaled to at most the clean norm (`dp_noise`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

import fedamole
from fedamole.fl.protocol import DP_MECHANISMS, EmbeddingStats

__all__ = [
    "DP_MECHANISMS",
    "gamma_uniform_noise",
    "gamma_uniform_moments",
    "clip_rows",
    "dp_noise",
    "example_norm_bounds",
    "privatize_stats",
]


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"dp_eta must be a finite number > 0, got {eta!r}")
    return float(eta)


def gamma_uniform_noise(shape, eta: float, rng: np.random.Generator) -> Tensor:
    """float32 noise of ``shape``: per coordinate Gamma(shape = shape[-1], rate = eta) x Uniform(-1, 1)."""
    eta = _check_eta(eta)
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] < 1:
        raise ValueError(f"shape must have a last dimension >= 1, got {shape}")
    g = rng.gamma(shape=shape[-1], scale=1.0 / eta, size=shape)
    u = rng.uniform(-1.0, 1.0, size=shape)
    return torch.from_numpy(g * u).float()


def gamma_uniform_moments(dim: int, eta: float) -> dict[str, float]:
    """Closed-form moments of one coordinate X = G U of `gamma_uniform_noise` (G ~ Gamma(dim, rate eta),
    U ~ U(-1, 1), independent): E X = 0, E|X| = E G / 2, E X^2 = E G^2 / 3, E X^4 = E G^4 / 5."""
    k, eta = float(dim), _check_eta(eta)
    return {
        "mean": 0.0,
        "abs_mean": k / eta / 2,
        "var": k * (k + 1) / eta**2 / 3,
        "fourth": k * (k + 1) * (k + 2) * (k + 3) / eta**4 / 5,
    }


def clip_rows(x: Tensor, bound: Tensor) -> Tensor:
    """Each vector along the last dimension of ``x`` rescaled to norm at most ``bound`` (broadcast over the
    leading dimensions: a scalar, or one bound per row)."""
    norms = x.norm(dim=-1)
    scale = torch.clamp(bound.to(x.dtype) / norms.clamp(min=1e-30), max=1.0)
    return x * scale.unsqueeze(-1)


def dp_noise(v: Tensor, eta: float, generator: torch.Generator) -> Tensor:
    """Metric-DP noise on one embedding: v + rho u, rho ~ Gamma(d, 1/eta), u uniform on the unit sphere; the result
    is rescaled to at most the clean norm (larger eta = less noise)."""
    eta = _check_eta(eta)
    v = v.float()
    d = v.numel()
    direction = torch.randn(d, generator=generator)
    direction = direction / direction.norm().clamp(min=1e-12)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rho = float(np.random.default_rng(seed).gamma(d, 1.0 / eta))
    noisy = v.reshape(-1) + rho * direction
    clean, new = v.norm(), noisy.norm()
    if new > clean:
        noisy = noisy * (clean / new.clamp(min=1e-12))
    return noisy.reshape(v.shape)


@torch.no_grad()
def example_norm_bounds(workload, examples, batch_size: int = 16) -> dict[str, dict[str, Tensor]]:
    """Per module, the largest norm over ``examples`` of one example's statistic: ``{"t": {module: scalar},
    "e": {module: [k]}}`` where an example's t is the mean over its tokens of W_t x (x itself for the linear router)
    and its e_i the mean of A_i x (embedding router only)."""
    model = workload.model
    modules = fedamole.mole_modules(model)
    bounds: dict[str, dict[str, Tensor]] = {"t": {}, "e": {}}
    state = {"mask": None}

    def make_hook(name, m):
        def hook(_module, args):
            mask = state["mask"]
            x = args[0].reshape(*mask.shape, m.in_features).float()
            w = mask.to(x.dtype).unsqueeze(-1)
            x_bar = (x * w).sum(1) / w.sum(1).clamp(min=1)  # [B, d_in]: each example's mean input
            if m.config.router == "embedding":
                t = (x_bar @ m.router.float().T).norm(dim=-1).max()
                k = int(m.active_experts.sum())
                e = torch.einsum("bd,erd->ber", x_bar, m.lora_a[:k].float()).norm(dim=-1).amax(0)
                old = bounds["e"].get(name)
                bounds["e"][name] = e if old is None else torch.maximum(old, e)
            else:
                t = x_bar.norm(dim=-1).max()
            old = bounds["t"].get(name)
            bounds["t"][name] = t if old is None else torch.maximum(old, t)

        return hook

    hooks = [m.register_forward_pre_hook(make_hook(name, m)) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in workload.batches(examples, batch_size):
            state["mask"] = batch["attention_mask"].bool()
            workload.forward_tokens(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {part: {k: v.cpu() for k, v in vals.items()} for part, vals in bounds.items()}


def privatize_stats(workload, stats: EmbeddingStats, examples, mechanism: str, eta: float, seed: int) -> EmbeddingStats:
    """The statistics with ``mechanism``'s noise (see the module docstring); ``seed`` fixes the draws (t first, then
    e, each in module order)."""
    eta = _check_eta(eta)
    parts = {"t": stats.t, "e": stats.e}
    if mechanism == "metric-sphere":
        gen = torch.Generator().manual_seed(seed)
        return EmbeddingStats(
            **{
                part: {
                    name: dp_noise(v, eta, gen) if v.dim() == 1 else torch.stack([dp_noise(r, eta, gen) for r in v])
                    for name, v in vals.items()
                }
                for part, vals in parts.items()
            }
        )
    if mechanism != "gamma-uniform":
        raise ValueError(f"dp_mechanism must be one of {DP_MECHANISMS}, got {mechanism!r}")
    bounds = example_norm_bounds(workload, examples)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Tensor]] = {}
    for part, vals in parts.items():
        out[part] = {}
        for name, v in vals.items():
            noisy = v.float() + gamma_uniform_noise(v.shape, eta, rng)
            out[part][name] = clip_rows(noisy, bounds[part][name])
    return EmbeddingStats(**out)
