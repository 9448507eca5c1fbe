"""Baselines on one LoRA per module, built from the same layer: a MoLELinear with one routed slot, top_k = 1 and no
shared expert computes exactly ``W0 x + s B A x`` (the single gate is 1), i.e. plain LoRA.

* FedIT: FedAvg of LoRA (+ head); scored with the aggregated model.
* FedIT-FT: the same training, scored with each client's locally fine-tuned model (before aggregation).
* local: every client trains its own LoRA, nothing is exchanged.
* FFA-LoRA: A frozen at its (common) initialisation, only B (+ head) trained and averaged; aggregated model scored.

FedAvg here is the authors' plain mean over the clients that uploaded (``aggregation="mean"``, the default);
``aggregation="weighted"`` weights each client by its training-set size instead (FedAvg as McMahan et al. state it).
FDLoRA lives in `fedamole.fl.fdlora`, the prompt-learning baselines in `fedamole.fl.prompt_baselines`.
"""

from __future__ import annotations

import dataclasses

import torch

import fedamole
from fedamole.adapter_state import ROUTED_KINDS, split_key, state_key
from fedamole.config import MoLEConfig
from fedamole.fl.aggregation import mean_states
from fedamole.fl.algorithm import Algorithm, check_keys, extra_state
from fedamole.fl.protocol import ClientResult, ClientTask

__all__ = ["LoRABaseline", "BASELINES", "AGGREGATIONS", "fedavg", "single_lora_config", "initial_lora_state"]

BASELINES = ("fedit", "fedit-ft", "local", "ffa-lora")
AGGREGATIONS = ("mean", "weighted")


def fedavg(states: list[dict], num_train: list[int], aggregation: str) -> dict:
    """Key-wise average of client states: plain mean ("mean") or weighted by training-set size ("weighted")."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return mean_states(states, None if aggregation == "mean" else [max(int(n), 1) for n in num_train])


def single_lora_config(base: MoLEConfig) -> MoLEConfig:
    """The layer configuration of plain LoRA: one routed slot, top-1, no shared expert, no load-balance loss."""
    return dataclasses.replace(
        base, num_experts=1, top_k=1, router="linear", shared_expert=False, load_balance_coef=0.0
    )


def initial_lora_state(model, seed: int) -> dict:
    """The common starting state of the single-LoRA baselines: one freshly initialised LoRA per module (seeded;
    A Kaiming-uniform, B = 0) and the head, as float32 CPU copies."""
    torch.manual_seed(seed)
    lora = {}
    for name, m in fedamole.mole_modules(model).items():
        m.reset_parameters()
        for kind in ROUTED_KINDS:
            lora[state_key(name, kind)] = getattr(m, kind)[:1].detach().float().clone()
    return {**lora, **extra_state(model)}


class LoRABaseline(Algorithm):
    """One of `BASELINES` (see the module docstring). State: the global LoRA (``glob``; empty for "local") and each
    client's private state (``private``)."""

    STATE = ("glob", "private")

    def __init__(self, name: str, aggregation: str = "mean") -> None:
        if name not in BASELINES:
            raise ValueError(f"name must be one of {BASELINES}, got {name!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.name, self.aggregation = name, aggregation
        self.evaluates_global = name in ("fedit", "ffa-lora")

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        return single_lora_config(base)

    def initial_state(self, model, seed: int) -> dict:
        """The state every client starts from (see `initial_lora_state`)."""
        return initial_lora_state(model, seed)

    def setup(self, model, num_train: list[int], seed: int) -> None:
        self.num_clients, self.num_train = len(num_train), [int(n) for n in num_train]
        state = self.initial_state(model, seed)
        if self.name == "local":
            self.glob = {}
            self.private = [{k: v.clone() for k, v in state.items()} for _ in range(self.num_clients)]
        else:
            self.glob = state
            self.private = [{} for _ in range(self.num_clients)]
        self.a_keys = [k for k in state if split_key(k)[1] == "lora_a"]
        self.state_keys = tuple(state)

    def check_state(self) -> None:
        """The global state holds exactly the initial keys (none for "local"); every client's private state a subset of
        them; one private state per client."""
        check_keys("glob", self.glob, () if self.name == "local" else self.state_keys)
        if not isinstance(self.private, list) or len(self.private) != self.num_clients:
            raise ValueError(f"private must be a list of {self.num_clients} client states")
        for c, private in enumerate(self.private):
            check_keys(f"private[{c}]", private, self.state_keys, subset=True)

    def payloads(self, round_idx: int) -> list[ClientTask]:
        out = []
        for c in range(self.num_clients):
            private, frozen = self.private[c], ()
            if self.name == "ffa-lora":
                # A is sent once (with a client's first round) and then kept frozen by it; only B (+ head) travels.
                first = round_idx == 1 or not private
                down = dict(self.glob) if first else {k: v for k, v in self.glob.items() if k not in self.a_keys}
                upload, keep, frozen = [k for k in self.glob if k not in self.a_keys], self.a_keys, ("lora_a",)
                if first:
                    private = {}
            elif self.name == "local":
                down, upload, keep = {}, [], list(private)
            else:
                down, upload, keep = dict(self.glob), list(self.glob), []
            out.append(
                ClientTask(
                    down=down,
                    private=private,
                    upload=tuple(upload),
                    keep=tuple(keep),
                    frozen=frozen,
                    evaluate=not self.evaluates_global,
                    stats=False,
                )
            )
        return out

    def aggregate(self, round_idx: int, uploads: list[ClientResult | None]) -> None:
        """FedAvg over the clients that uploaded (``None``: failed, dropped out or rejected; such a client keeps
        its previous private state and the global state ignores it)."""
        live = [c for c, u in enumerate(uploads) if u is not None]
        for c in live:
            self.private[c] = uploads[c].private
        if self.name == "local" or not live:
            return
        self.glob.update(fedavg([uploads[c].up for c in live], [self.num_train[c] for c in live], self.aggregation))

    def eval_payloads(self) -> list[ClientTask]:
        return [
            ClientTask(down=dict(self.glob), private={}, upload=(), keep=(), steps=0, evaluate=True, stats=False)
            for _ in range(self.num_clients)
        ]
