"""Where an adapter state's tensors live, and the three things done with a state there: load it, cut an upload from
it, poison it (fault "diverge"). One implementation serves the model (`ModelTensors`, used by
`fedamole.fl.client`) and each client of a cohort's stacked tensors (`fedamole.fl.cohort_stack.ClientStack`), so a
client's tensors are the same whichever engine runs it.

A slot tensor of a state (see `fedamole.adapter_state`) with k rows fills slots 0..k-1, zeroes the others and marks
exactly those k active; every other tensor is copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

import fedamole
from fedamole.adapter_state import EXTRA_KIND, is_slot_kind, kind_of, slot_kinds, split_key

__all__ = ["AdapterTensors", "ModelTensors", "load_into", "extract_from", "poison"]


class AdapterTensors:
    """The tensors a state's keys name: ``modules`` {name: MoLE module} (for slot counts and router kinds),
    `mole(module, kind)`, `extra(key)` (None when no such tensor) and `set_active(module, k)`."""

    def __init__(self, modules: dict) -> None:
        self.modules = modules

    def mole(self, module: str, kind: str) -> Tensor:
        raise NotImplementedError

    def extra(self, key: str) -> Tensor | None:
        raise NotImplementedError

    def set_active(self, module: str, k: int) -> None:
        raise NotImplementedError

    def locate(self, key: str) -> tuple[Tensor, bool]:
        """(the tensor behind ``key``, whether it is a slot tensor); ValueError for a key that names nothing."""
        module, kind = kind_of(key, self.modules)
        if kind != EXTRA_KIND:
            return self.mole(module, kind), is_slot_kind(kind, self.modules[module].config.router)
        tensor = self.extra(key)
        if tensor is None:
            raise ValueError(f"state: unknown parameter {key!r}")
        return tensor, False


class ModelTensors(AdapterTensors):
    """A model's MoLE modules and parameters."""

    def __init__(self, model) -> None:
        super().__init__(fedamole.mole_modules(model))
        self.params = dict(model.named_parameters())

    def mole(self, module: str, kind: str) -> Tensor:
        return getattr(self.modules[module], kind)

    def extra(self, key: str) -> Tensor | None:
        return self.params.get(key)

    def set_active(self, module: str, k: int) -> None:
        mask = torch.zeros(self.modules[module].config.num_experts, dtype=torch.bool)
        mask[:k] = True
        self.modules[module].set_active_experts(mask)


@torch.no_grad()
def load_into(target: AdapterTensors, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``target`` (slot tensors into the first k slots, the rest zeroed, k slots active)."""
    active: dict[str, int] = {}
    for key, value in state.items():
        tensor, slotted = target.locate(key)
        if slotted:
            module = split_key(key)[0]
            k = value.shape[0]
            if active.setdefault(module, k) != k:
                raise ValueError(f"state: {key} has {k} experts, other tensors of {module} have {active[module]}")
            num_slots = target.modules[module].config.num_experts
            if k > num_slots:
                raise ValueError(f"state: {key} has {k} experts but {module} has {num_slots} slots")
            tensor[:k].copy_(value)
        else:
            tensor.copy_(value)
    # Slots k.. belong to no one in this state (masked means absent): whatever an earlier client left there (NaN
    # from a diverged client included) must not reach this one.
    for module, k in active.items():
        for kind in slot_kinds(target.modules[module].config.router):
            target.mole(module, kind)[k:].zero_()
        target.set_active(module, k)


@torch.no_grad()
def extract_from(target: AdapterTensors, keys: Iterable[str], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU copies of the tensors named by ``keys``, slot tensors cut to the rows they have in ``like``."""
    out = {}
    for key in keys:
        tensor, slotted = target.locate(key)
        out[key] = (tensor[: like[key].shape[0]] if slotted else tensor).detach().cpu().clone()
    return out


@torch.no_grad()
def poison(target: AdapterTensors, state: dict[str, Tensor], frozen) -> None:
    """Fault "diverge": every tensor of ``state`` the client trains becomes NaN, as after a blown-up loss (slot
    tensors only in the slots the client holds: the others are not its own)."""
    for key, value in state.items():
        if kind_of(key, target.modules)[1] in frozen:
            continue
        tensor, slotted = target.locate(key)
        (tensor[: value.shape[0]] if slotted else tensor).fill_(math.nan)
