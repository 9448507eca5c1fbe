"""`ClientStack`: the adapter tensors of a cohort's S clients, stacked along a leading client dimension and owned by
the cohort engine. The model is never changed: its MoLE modules read the stack through `use_segments`.

Each client's starting tensors are exactly what `fedamole.fl.client.load_state` would put in the model for its
state: a routed-expert tensor with k rows fills slots 0..k-1 (the other slots zero, only those k active), every
other tensor is copied whole, and a parameter absent from the state keeps the model's value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import fedamole
from fedamole.adapter_state import EXTRA_KIND, MOLE_KINDS, is_slot_kind, split_key
from fedamole.segments import ClientWeights

__all__ = ["ClientStack", "NotStackable"]


class NotStackable(Exception):
    """The stacked path cannot represent these clients (e.g. a trainable tensor outside MoLE and the head)."""


class ClientStack:
    """Stacked adapters of S clients: ``mole[module][kind]`` and ``extra[module][param]`` are Parameters [S, ...]
    (``requires_grad`` only where some state key names them and their kind is not frozen), ``active[module]`` bool
    [S, E]. `weights()` / `extra_params()` feed `use_segments`; `state(s, keys, like)` cuts client s's upload."""

    def __init__(self, model: nn.Module, states: Sequence[dict[str, Tensor]], frozen: set[str]) -> None:
        self.modules = fedamole.mole_modules(model)
        self.num_clients = num = len(states)
        params = dict(model.named_parameters())
        extra_names = list(getattr(model, "fedamole_extra_trainable", []))
        self.mole: dict[str, dict[str, nn.Parameter]] = {}
        self.active: dict[str, Tensor] = {}
        with torch.no_grad():
            stacked = {
                name: {
                    k: getattr(m, k).detach().expand(num, *getattr(m, k).shape).clone()
                    for k in MOLE_KINDS
                    if getattr(m, k) is not None
                }
                for name, m in self.modules.items()
            }
            active = {name: m.active_experts.expand(num, -1).clone() for name, m in self.modules.items()}
            extra = {
                e: {k: p.detach().expand(num, *p.shape).clone() for k, p in model.get_submodule(e).named_parameters()}
                for e in extra_names
            }
        trainable: set[tuple[str, str]] = set()
        for s, state in enumerate(states):
            slots: dict[str, int] = {}
            for key, value in state.items():
                mod, kind = split_key(key)
                owner = next((e for e in extra_names if key.startswith(e + ".")), None)
                if mod in self.modules and kind in stacked[mod]:
                    target = stacked[mod][kind]
                    if is_slot_kind(kind, self.modules[mod].config.router):
                        k = slots.setdefault(mod, value.shape[0])
                        if k != value.shape[0] or k > target.shape[1]:
                            raise NotStackable(f"state of client {s}: {key} has {value.shape[0]} experts ({mod}: {k})")
                        target[s, :k].copy_(value)
                    else:
                        target[s].copy_(value)
                    if kind not in frozen:
                        trainable.add((mod, kind))
                elif owner is not None and key[len(owner) + 1 :] in extra[owner]:
                    extra[owner][key[len(owner) + 1 :]][s].copy_(value)
                    if EXTRA_KIND not in frozen:
                        trainable.add((owner, key[len(owner) + 1 :]))
                elif key in params:
                    raise NotStackable(f"state key {key!r} is neither a MoLE tensor nor in an extra trainable module")
                else:
                    raise ValueError(f"state: unknown parameter {key!r}")
            for mod, k in slots.items():
                module = self.modules[mod]
                for kind in MOLE_KINDS:
                    if kind in stacked[mod] and is_slot_kind(kind, module.config.router):
                        stacked[mod][kind][s, k:].zero_()
                active[mod][s] = torch.arange(active[mod].shape[1], device=active[mod].device) < k
        self.active = active
        self.mole = {
            mod: {k: nn.Parameter(t, requires_grad=(mod, k) in trainable) for k, t in kinds.items()}
            for mod, kinds in stacked.items()
        }
        self.extra = {
            e: {k: nn.Parameter(t, requires_grad=(e, k) in trainable) for k, t in ps.items()} for e, ps in extra.items()
        }

    def trainable(self) -> list[nn.Parameter]:
        """The Parameters the cohort trains, in a fixed order."""
        out = [p for kinds in self.mole.values() for p in kinds.values() if p.requires_grad]
        return out + [p for ps in self.extra.values() for p in ps.values() if p.requires_grad]

    def weights(self) -> dict[str, ClientWeights]:
        return {
            mod: ClientWeights(
                kinds["lora_a"],
                kinds["lora_b"],
                kinds["router"],
                kinds.get("shared_a"),
                kinds.get("shared_b"),
                self.active[mod],
            )  # fmt: skip
            for mod, kinds in self.mole.items()
        }

    def extra_params(self) -> dict[str, dict[str, Tensor]]:
        return {e: dict(ps) for e, ps in self.extra.items()}

    def tensor(self, key: str) -> Tensor:
        """The stacked tensor [S, ...] behind a state key."""
        mod, kind = split_key(key)
        if mod in self.mole and kind in self.mole[mod]:
            return self.mole[mod][kind]
        owner = next((e for e in self.extra if key.startswith(e + ".")), None)
        if owner is None:
            raise KeyError(f"state key {key!r} is not in the stack")
        return self.extra[owner][key[len(owner) + 1 :]]

    @torch.no_grad()
    def state(self, client: int, keys: Sequence[str], like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Client ``client``'s tensors named by ``keys`` as CPU copies, slot tensors cut to their size in ``like``
        (as `fedamole.fl.client.extract_state` cuts them from the model)."""
        out = {}
        for key in keys:
            value = self.tensor(key)[client]
            mod, kind = split_key(key)
            if mod in self.modules and is_slot_kind(kind, self.modules[mod].config.router):
                value = value[: like[key].shape[0]]
            out[key] = value.detach().cpu().clone()
        return out

    @torch.no_grad()
    def diverge(self, client: int, state: dict[str, Tensor], frozen: set[str]) -> None:
        """Fault "diverge" for one client: every tensor it trains becomes NaN (slot tensors in its own slots)."""
        for key, value in state.items():
            mod, kind = split_key(key)
            if (kind if mod in self.modules else EXTRA_KIND) in frozen:
                continue
            target = self.tensor(key)[client]
            if mod in self.modules and is_slot_kind(kind, self.modules[mod].config.router):
                target = target[: value.shape[0]]
            target.fill_(math.nan)
