"""Reverse selection-based expert assignment (RSEA, SPEC §3 step 7).

Each domain expert picks exactly ``clients_per_expert`` clients and each client ends up with between
``min_experts`` and ``max_experts`` experts, maximising the total score ``sum P[i, c] X[i, c]``. The constraint
matrix is the incidence matrix of a bipartite graph (experts x clients), hence totally unimodular: the LP
relaxation over ``0 <= X <= 1`` has an integral optimal vertex, which HiGHS returns. Integrality is checked anyway
and ``scipy.optimize.milp`` is the fallback.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["assign_experts", "check_feasible", "score_matrix"]

_INT_TOL = 1e-6


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def check_feasible(num_experts: int, num_clients: int, clients_per_expert: int, min_experts: int, max_experts: int):
    """Raise ValueError, with the failing arithmetic, when no assignment satisfies the constraints."""
    n_e, c = num_experts, num_clients
    k, lo, hi = clients_per_expert, min_experts, max_experts
    if lo > hi:
        raise ValueError(f"min_experts ({lo}) must be <= max_experts ({hi})")
    if k > c:
        raise ValueError(
            f"infeasible: clients_per_expert ({k}) > number of clients ({c}); an expert needs {k} distinct clients"
        )
    total = n_e * k
    if total > c * hi:
        raise ValueError(
            f"infeasible: experts x clients_per_expert = {n_e} x {k} = {total} > clients x max_experts"
            f" = {c} x {hi} = {c * hi}; raise max_experts or lower clients_per_expert"
        )
    if total < c * lo:
        raise ValueError(
            f"infeasible: experts x clients_per_expert = {n_e} x {k} = {total} < clients x min_experts"
            f" = {c} x {lo} = {c * lo}; add experts or lower min_experts"
        )


def _constraints(n_e: int, c: int, k: int, lo: int, hi: int):
    """Sparse equality (expert rows) and inequality (client rows) constraints on x = X.ravel() (row-major)."""
    import scipy.sparse as sp  # here, not at module level: scipy.optimize is ~0.7 s of `fedamole --help`

    var = np.arange(n_e * c)
    expert_rows = sp.csr_matrix((np.ones(n_e * c), (var // c, var)), shape=(n_e, n_e * c))
    client_rows = sp.csr_matrix((np.ones(n_e * c), (var % c, var)), shape=(c, n_e * c))
    return expert_rows, np.full(n_e, float(k)), client_rows, np.full(c, float(lo)), np.full(c, float(hi))


def assign_experts(scores, clients_per_expert: int = 2, min_experts: int = 2, max_experts: int = 8) -> np.ndarray:
    """Optimal expert-to-client assignment.

    Args:
        scores: array-like [N_e, C], the matrix P (higher = expert i prefers client c); finite.
        clients_per_expert: k_c, the number of clients each expert is sent to (exactly).
        min_experts / max_experts: bounds on the number of experts each client holds.

    Returns:
        numpy bool array [N_e, C]; ``X[i, c]`` is True when client c holds expert i.

    Raises:
        ValueError: bad scores (not 2-D, empty, non-finite), bad integers, or an infeasible setting.
    """
    p = np.asarray(scores, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"scores must be a 2-D [num_experts, num_clients] array, got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"scores must be non-empty, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("scores must be finite (found NaN or inf)")
    k = _check_int("clients_per_expert", clients_per_expert)
    lo = _check_int("min_experts", min_experts)
    hi = _check_int("max_experts", max_experts)
    n_e, c = p.shape
    check_feasible(n_e, c, k, lo, hi)

    import scipy.optimize as sopt
    import scipy.sparse as sp

    a_eq, b_eq, a_cl, lo_cl, hi_cl = _constraints(n_e, c, k, lo, hi)
    cost = -p.ravel()
    res = sopt.linprog(
        cost,
        A_ub=sp.vstack([a_cl, -a_cl]).tocsr(),
        b_ub=np.concatenate([hi_cl, -lo_cl]),
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=(0.0, 1.0),
        method="highs",
    )
    x = res.x if res.status == 0 else None
    if x is None or np.abs(x - np.round(x)).max() > _INT_TOL:
        cons = [sopt.LinearConstraint(a_eq, b_eq, b_eq), sopt.LinearConstraint(a_cl, lo_cl, hi_cl)]
        res = sopt.milp(cost, constraints=cons, integrality=np.ones(n_e * c), bounds=sopt.Bounds(0.0, 1.0))
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"expert assignment failed: {res.message}")
        x = res.x
    return (np.round(x) > 0.5).reshape(n_e, c)


def score_matrix(expert_emb, client_emb, rank: int | None = None) -> np.ndarray:
    """P of SPEC §3: S[i, c] = e_i . t_c / sqrt(r), then softmax over clients (axis 1).

    expert_emb [N_e, r], client_emb [C, r]; ``rank`` defaults to the embedding width.
    """
    e = np.asarray(expert_emb, dtype=np.float64)
    t = np.asarray(client_emb, dtype=np.float64)
    if e.ndim != 2 or t.ndim != 2 or e.shape[1] != t.shape[1]:
        raise ValueError(f"expert_emb [N_e, r] and client_emb [C, r] must share r, got {e.shape} and {t.shape}")
    s = e @ t.T / np.sqrt(rank if rank is not None else e.shape[1])
    s = s - s.max(axis=1, keepdims=True)
    ex = np.exp(s)
    return ex / ex.sum(axis=1, keepdims=True)
