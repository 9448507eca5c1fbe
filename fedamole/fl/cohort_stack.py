"""`ClientStack`: the adapter tensors of a cohort's S clients, stacked along a leading client dimension and owned by
the cohort engine. The model is never changed: its MoLE modules read the stack through `use_segments`.

Each client's starting tensors are what `fedamole.fl.client.load_state` would put in the model for its state (both
go through `fedamole.fl.adapter_tensors.load_into`); a parameter absent from the state keeps the model's value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import fedamole
from fedamole.adapter_state import MOLE_KINDS, kind_of
from fedamole.fl.adapter_tensors import AdapterTensors, extract_from, load_into, poison
from fedamole.segments import ClientWeights

__all__ = ["ClientStack"]


class _ClientSlice(AdapterTensors):
    """Client ``client``'s view of a `ClientStack`: its row of every stacked tensor."""

    def __init__(self, stack: ClientStack, client: int) -> None:
        super().__init__(stack.modules)
        self.stack, self.client = stack, client

    def mole(self, module: str, kind: str) -> Tensor:
        return self.stack.mole[module][kind][self.client]

    def extra(self, key: str) -> Tensor | None:
        tensor = self.stack.extra_by_key.get(key)
        return None if tensor is None else tensor[self.client]

    def set_active(self, module: str, k: int) -> None:
        active = self.stack.active[module]
        active[self.client] = torch.arange(active.shape[1], device=active.device) < k


class ClientStack:
    """Stacked adapters of S clients: ``mole[module][kind]`` and ``extra[module][param]`` are Parameters [S, ...]
    (``requires_grad`` only where some state key names them and their kind is not frozen), ``active[module]`` bool
    [S, E]. `weights()` / `extra_params()` feed `use_segments`; `state(s, keys, like)` cuts client s's upload."""

    def __init__(self, model: nn.Module, states: Sequence[dict[str, Tensor]], frozen: set[str]) -> None:
        self.modules = fedamole.mole_modules(model)
        self.num_clients = num = len(states)

        # Trained: what the states name, unless its kind is frozen.
        trainable = {key for key in (states[0] if states else {}) if kind_of(key, self.modules)[1] not in frozen}

        def stacked(t: Tensor, key: str | None = None) -> Tensor:
            value = t.detach().expand(num, *t.shape).clone()
            return value if key is None else nn.Parameter(value, requires_grad=key in trainable)

        with torch.no_grad():
            self.mole = {
                name: {k: stacked(getattr(m, k), f"{name}.{k}") for k in MOLE_KINDS if getattr(m, k) is not None}
                for name, m in self.modules.items()
            }
            self.active = {name: stacked(m.active_experts) for name, m in self.modules.items()}
            self.extra = {
                e: {k: stacked(p, f"{e}.{k}") for k, p in model.get_submodule(e).named_parameters()}
                for e in getattr(model, "fedamole_extra_trainable", [])
            }
            self.extra_by_key = {f"{e}.{k}": t for e, ps in self.extra.items() for k, t in ps.items()}
            for s, state in enumerate(states):
                load_into(self.client(s), state)
        # What `use_segments` reads, built once: the Parameters above, updated in place by the optimiser.
        self._weights = {
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

    def client(self, client: int) -> AdapterTensors:
        """Client ``client``'s tensors, as `fedamole.fl.adapter_tensors` reads and writes them."""
        return _ClientSlice(self, client)

    def trainable(self) -> list[nn.Parameter]:
        """The Parameters the cohort trains, in a fixed order."""
        out = [p for kinds in self.mole.values() for p in kinds.values() if p.requires_grad]
        return out + [p for ps in self.extra.values() for p in ps.values() if p.requires_grad]

    def weights(self) -> dict[str, ClientWeights]:
        return self._weights

    def extra_params(self) -> dict[str, dict[str, Tensor]]:
        return self.extra

    def state(self, client: int, keys: Sequence[str], like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Client ``client``'s tensors named by ``keys`` as CPU copies, slot tensors cut to their size in ``like``
        (as `fedamole.fl.client.extract_state` cuts them from the model)."""
        return extract_from(self.client(client), keys, like)

    def diverge(self, client: int, state: dict[str, Tensor], frozen: set[str]) -> None:
        """Fault "diverge" for one client: every tensor it trains becomes NaN (slot tensors in its own slots)."""
        poison(self.client(client), state, frozen)
