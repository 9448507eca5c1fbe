"""FedAMoLE server (SPEC §3) and its ablations.

Per MoLE module the server holds N_e domain experts (A [N_e, r, d_in], B [N_e, d_out, r]), one shared expert and
the token projection W_t (``router``; with the linear-router ablation one router row per domain expert instead).
Clients hold between min_experts and max_experts of the domain experts, in the slots of a MoLELinear with
``num_experts = max_experts`` slots.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

import fedamole
from fedamole.adapter_state import MOLE_KINDS, slot_kinds, state_key
from fedamole.config import ROUTERS, MoLEConfig
from fedamole.fl.aggregation import expert_mean, mean_tensors, random_scores
from fedamole.fl.algorithm import Algorithm, extra_state
from fedamole.fl.protocol import DP_MECHANISMS, ClientResult, ClientTask
from fedamole.fl.rsea import assign_experts, check_feasible, score_matrix

__all__ = ["FedAMoLE", "ASSIGNMENTS"]

ASSIGNMENTS = ("rsea", "static", "random", "homogeneous", "static-homogeneous")
_HOMOGENEOUS = ("homogeneous", "static-homogeneous")
_STATIC = ("static", "static-homogeneous")


def _kaiming(shape, fan_in: int, gen: torch.Generator) -> Tensor:
    """LoRA's Kaiming-uniform(a=sqrt(5)) initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


class FedAMoLE(Algorithm):
    """FedAMoLE with RSEA (``assignment="rsea"``) or an ablation: "static" (keep the round-0 assignment),
    "random" (a fresh random assignment every round), "homogeneous" (every client exactly N_e k_c / C experts,
    re-assigned by RSEA), "static-homogeneous" (every client exactly N_e k_c / C experts, the random round-0
    assignment kept: what the authors plotted as "homogeneous"); ``router="linear"`` is the vanilla-router ablation.
    ``dp_eta`` adds noise of ``dp_mechanism`` (`fedamole.fl.dp`) to the uploaded embedding statistics.

    State: per MoLE module its pool, rank and current assignment (``modules``), the head (``extra``), the assignment
    of every past round (``history_assign``) and the generator of random assignments (``rng``)."""

    STATE = ("modules", "extra", "history_assign", "rng")

    def __init__(
        self,
        num_experts: int = 30,
        clients_per_expert: int = 2,
        min_experts: int = 2,
        max_experts: int = 8,
        assignment: str = "rsea",
        router: str = "embedding",
        dp_eta: float | None = None,
        dp_mechanism: str = "gamma-uniform",
        name: str = "fedamole",
    ) -> None:
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
        if router not in ROUTERS:
            raise ValueError(f"router must be 'embedding' or 'linear', got {router!r}")
        if dp_eta is not None and (not math.isfinite(dp_eta) or dp_eta <= 0):
            raise ValueError(f"dp_eta must be None or a finite number > 0, got {dp_eta!r}")
        if dp_mechanism not in DP_MECHANISMS:
            raise ValueError(f"dp_mechanism must be one of {DP_MECHANISMS}, got {dp_mechanism!r}")
        self.num_experts, self.k_c = int(num_experts), int(clients_per_expert)
        self.min_experts, self.max_experts = int(min_experts), int(max_experts)
        self.assignment, self.router, self.dp_eta, self.name = assignment, router, dp_eta, name
        self.dp_mechanism = dp_mechanism

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        return dataclasses.replace(base, num_experts=self.max_experts, router=self.router, shared_expert=True)

    # -- set-up ---------------------------------------------------------------------------------------------
    def _bounds(self, num_clients: int) -> tuple[int, int]:
        if self.assignment not in _HOMOGENEOUS:
            return self.min_experts, self.max_experts
        total = self.num_experts * self.k_c
        if total % num_clients:
            raise ValueError(
                f"homogeneous assignment needs num_experts x clients_per_expert = {self.num_experts} x "
                f"{self.k_c} = {total} divisible by the number of clients ({num_clients})"
            )
        if total // num_clients > self.max_experts:
            raise ValueError(
                f"homogeneous assignment gives {total // num_clients} experts per client > "
                f"max_experts ({self.max_experts})"
            )
        return total // num_clients, total // num_clients

    def setup(self, model, num_train: list[int], seed: int) -> None:
        self.num_clients = len(num_train)
        lo, hi = self._bounds(self.num_clients)
        check_feasible(self.num_experts, self.num_clients, self.k_c, lo, hi)
        self.rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        self.modules = {}
        for name, m in fedamole.mole_modules(model).items():
            r, d_in, d_out = m.config.rank, m.in_features, m.out_features
            pool = {
                "lora_a": _kaiming((self.num_experts, r, d_in), d_in, gen),
                "lora_b": torch.zeros(self.num_experts, d_out, r),
                "shared_a": _kaiming((r, d_in), d_in, gen),
                "shared_b": torch.zeros(d_out, r),
            }
            rows = (self.num_experts, d_in) if self.router == "linear" else (r, d_in)
            pool["router"] = _kaiming(rows, d_in, gen)
            self.modules[name] = {
                "pool": pool,
                "rank": r,
                "assign": self._assign(random_scores(self.num_experts, self.num_clients, self.rng)),
            }
        self.extra = extra_state(model)
        self.history_assign: list[dict[str, np.ndarray]] = []

    def _assign(self, scores: np.ndarray) -> np.ndarray:
        lo, hi = self._bounds(self.num_clients)
        return assign_experts(scores, self.k_c, lo, hi)

    # -- rounds ---------------------------------------------------------------------------------------------
    def payloads(self, round_idx: int) -> list[ClientTask]:
        out = []
        for c in range(self.num_clients):
            down, ids_all = {}, {}
            for name, mod in self.modules.items():
                ids = np.flatnonzero(mod["assign"][:, c])
                for kind in MOLE_KINDS:  # slot tensors: the client's experts' rows; the others whole
                    value = mod["pool"][kind]
                    down[state_key(name, kind)] = value[ids] if kind in slot_kinds(self.router) else value
                ids_all[name] = ids.astype(np.int32)
            down.update(self.extra)
            needs_stats = self.assignment in ("rsea", "homogeneous")
            out.append(
                ClientTask(
                    down=down,
                    expert_ids=ids_all,
                    upload=tuple(down),
                    evaluate=True,
                    stats=needs_stats,
                    dp_eta=self.dp_eta if needs_stats else None,
                    dp_mechanism=self.dp_mechanism,
                    router=self.router,
                )
            )
        return out

    def aggregate(self, round_idx: int, uploads: list[ClientResult | None]) -> None:
        """Per-expert plain means over the holders that uploaded, then the next assignment.

        ``uploads[c] is None`` means client c failed, dropped out or was rejected: it contributes nothing, an
        expert none of whose holders uploaded keeps its value, and (without every client's statistics) the
        RSEA/homogeneous assignment of this round is kept as it was.
        """
        if len(uploads) != self.num_clients:
            raise ValueError(f"uploads: expected {self.num_clients}, got {len(uploads)}")
        self.history_assign.append({n: m["assign"].copy() for n, m in self.modules.items()})
        live = [c for c, u in enumerate(uploads) if u is not None]
        for name, mod in self.modules.items():
            pool, assign = mod["pool"], mod["assign"]
            ids = [np.flatnonzero(assign[:, c]) for c in range(self.num_clients)]
            slots = slot_kinds(self.router)
            for kind in slots:
                pool[kind] = expert_mean(pool[kind], [(ids[c], uploads[c].up[state_key(name, kind)]) for c in live])
            if live:
                for kind in (k for k in MOLE_KINDS if k not in slots):
                    pool[kind] = mean_tensors([uploads[c].up[state_key(name, kind)] for c in live])
            if len(live) == self.num_clients or self.assignment in (*_STATIC, "random"):
                mod["assign"] = self._next_assignment(name, mod, ids, uploads)
        if self.extra and live:
            self.extra = {k: mean_tensors([uploads[c].up[k] for c in live]) for k in self.extra}

    def client_scores(self, name: str, ids: list[np.ndarray], uploads: list[ClientResult]) -> np.ndarray:
        """P [N_e, C] for one module from the uploaded statistics (SPEC §3 step 7).

        Embedding router: e_i = mean of the holders' e_{c,i}, S = e t^T / sqrt(r). Linear router: the expert's
        aggregated router row against the client's mean token, S = R x_bar (its routing logit)."""
        t = torch.stack([u.stats.t[name].float() for u in uploads]).numpy()
        mod = self.modules[name]
        if self.router == "linear":
            return score_matrix(mod["pool"]["router"].numpy(), t, rank=1)
        e_pool = torch.zeros(self.num_experts, mod["rank"])
        e = expert_mean(e_pool, [(ids[c], u.stats.e[name]) for c, u in enumerate(uploads)]).numpy()
        return score_matrix(e, t, rank=mod["rank"])

    def _next_assignment(self, name, mod, ids, uploads) -> np.ndarray:
        if self.assignment in _STATIC:
            return mod["assign"]
        if self.assignment == "random":
            return self._assign(random_scores(self.num_experts, self.num_clients, self.rng))
        return self._assign(self.client_scores(name, ids, uploads))

    def check_state(self) -> None:
        """Every assignment (current and past) is bool [N_e, C] with exactly k_c clients per expert and between the
        client bounds of experts per client."""
        lo, hi = self._bounds(self.num_clients)
        named = [(f"modules[{n!r}].assign", m["assign"]) for n, m in self.modules.items()]
        named += [(f"history_assign[{i}][{n!r}]", a) for i, h in enumerate(self.history_assign) for n, a in h.items()]
        for where, assign in named:
            if (
                not isinstance(assign, np.ndarray)
                or assign.dtype != bool
                or assign.shape != (self.num_experts, self.num_clients)
            ):
                raise ValueError(f"{where} must be a bool array of shape [{self.num_experts}, {self.num_clients}]")
            per_expert, per_client = assign.sum(1), assign.sum(0)
            if (per_expert != self.k_c).any() or (per_client < lo).any() or (per_client > hi).any():
                raise ValueError(
                    f"{where}: every expert needs exactly {self.k_c} clients and every client between "
                    f"{lo} and {hi} experts; got {per_expert.tolist()} and {per_client.tolist()}"
                )

    def experts_per_client(self) -> dict[str, list[int]]:
        """Current |S_c| per module (the heterogeneous architecture)."""
        return {n: m["assign"].sum(0).astype(int).tolist() for n, m in self.modules.items()}
