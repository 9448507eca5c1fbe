"""Baselines on one LoRA per module, built from the same layer: a MoLELinear with one routed slot, top_k = 1 and no
shared expert computes exactly ``W0 x + s B A x`` (the single gate is 1), i.e. plain LoRA.

* FedIT: FedAvg (weighted by training-set size) of LoRA (+ head); scored with the aggregated model.
* FedIT-FT: the same training, scored with each client's locally fine-tuned model (before aggregation).
* local: every client trains its own LoRA, nothing is exchanged.
* FFA-LoRA: A frozen at its (common) initialisation, only B (+ head) trained and averaged; aggregated model scored.
* FDLoRA: a private LoRA (the routed slot) plus a global LoRA (the shared expert), outputs summed; the global one
  (+ head) is synchronised every ``sync_every`` rounds by an outer Nesterov-SGD step on the averaged update
  (lr 1.0, momentum 0.5). Between synchronisations clients keep their own copy. (The paper's AdaFusion weighting
  is replaced by a fixed sum.)
"""

from __future__ import annotations

import dataclasses

import torch

import fedamole
from fedamole.config import MoLEConfig
from fedamole.fl.aggregation import mean_states
from fedamole.fl.fedamole_algo import Algorithm, extra_state

__all__ = ["LoRABaseline", "BASELINES"]

BASELINES = ("fedit", "fedit-ft", "local", "ffa-lora", "fdlora")


class LoRABaseline(Algorithm):
    """One of `BASELINES` (see the module docstring)."""

    def __init__(self, name: str, sync_every: int = 5, outer_lr: float = 1.0, outer_momentum: float = 0.5) -> None:
        if name not in BASELINES:
            raise ValueError(f"name must be one of {BASELINES}, got {name!r}")
        if int(sync_every) < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every!r}")
        self.name = name
        self.sync_every, self.outer_lr, self.outer_momentum = int(sync_every), float(outer_lr), float(outer_momentum)
        self.evaluates_global = name in ("fedit", "ffa-lora")

    def mole_config(self, base: MoLEConfig) -> MoLEConfig:
        return dataclasses.replace(base, num_experts=1, top_k=1, router="linear",
                                   shared_expert=self.name == "fdlora", load_balance_coef=0.0)

    def setup(self, model, num_train: list[int], seed: int) -> None:
        self.num_clients, self.weights = len(num_train), [max(n, 1) for n in num_train]
        torch.manual_seed(seed)
        lora, shared = {}, {}
        for name, m in fedamole.mole_modules(model).items():
            m.reset_parameters()
            lora[f"{name}.lora_a"] = m.lora_a[:1].detach().float().clone()
            lora[f"{name}.lora_b"] = m.lora_b[:1].detach().float().clone()
            if m.shared_a is not None:
                shared[f"{name}.shared_a"] = m.shared_a.detach().float().clone()
                shared[f"{name}.shared_b"] = m.shared_b.detach().float().clone()
        head = extra_state(model)
        if self.name == "fdlora":
            self.glob = {**shared, **head}
            self.private = [{k: v.clone() for k, v in lora.items()} for _ in range(self.num_clients)]
            self.momentum = {k: torch.zeros_like(v) for k, v in self.glob.items()}
        elif self.name == "local":
            self.glob = {}
            self.private = [{k: v.clone() for k, v in {**lora, **head}.items()} for _ in range(self.num_clients)]
        else:
            self.glob = {**lora, **head}
            self.private = [{} for _ in range(self.num_clients)]
        self.a_keys = [k for k in lora if k.endswith(".lora_a")]

    def _down(self, round_idx: int) -> dict:
        if self.name == "local":
            return {}
        if self.name == "ffa-lora" and round_idx > 1:
            return {k: v for k, v in self.glob.items() if k not in self.a_keys}
        if self.name == "fdlora" and round_idx > 1 and (round_idx - 1) % self.sync_every:
            return {}
        return dict(self.glob)

    def payloads(self, round_idx: int) -> list[dict]:
        down = self._down(round_idx)
        out = []
        for c in range(self.num_clients):
            private = self.private[c]
            if self.name == "ffa-lora":
                upload, keep, frozen = [k for k in self.glob if k not in self.a_keys], self.a_keys, ("lora_a",)
                if round_idx == 1:
                    private = {}
            elif self.name == "local":
                upload, keep, frozen = [], list(private), ()
            elif self.name == "fdlora":
                sync = round_idx % self.sync_every == 0
                upload, keep, frozen = (list(self.glob) if sync else []), list({**private, **down}), ()
            else:
                upload, keep, frozen = list(self.glob), [], ()
            out.append({"down": down, "private": private, "upload": upload, "keep": keep, "frozen": frozen,
                        "evaluate": not self.evaluates_global, "stats": False})
        return out

    def aggregate(self, round_idx: int, uploads: list[dict | None]) -> None:
        """FedAvg over the clients that uploaded (``None``: failed, dropped out or rejected; such a client keeps
        its previous private state and the global state ignores it)."""
        live = [c for c, u in enumerate(uploads) if u is not None]
        for c in live:
            self.private[c] = uploads[c]["private"]
        if self.name == "local" or not live:
            return
        avg_needed = self.name != "fdlora" or round_idx % self.sync_every == 0
        if not avg_needed:
            return
        avg = mean_states([uploads[c]["up"] for c in live], [self.weights[c] for c in live])
        if self.name == "fdlora":
            for k, g in self.glob.items():
                delta = g - avg[k]
                self.momentum[k] = self.outer_momentum * self.momentum[k] + delta
                self.glob[k] = g - self.outer_lr * (delta + self.outer_momentum * self.momentum[k])
            return
        self.glob.update(avg)

    def eval_payloads(self) -> list[dict]:
        return [{"down": dict(self.glob), "private": {}, "upload": [], "keep": [], "steps": 0, "evaluate": True,
                 "stats": False} for _ in range(self.num_clients)]
