"""The key layout of adapter states, in one place.

An adapter state is a flat dict ``{key: tensor}``. A tensor of a MoLE module is keyed ``"<module>.<kind>"``: the
module's dotted name in the model, then one of `MOLE_KINDS` (or `MASK_KIND`, its active-expert mask); any other key
names a parameter of an extra trainable module (a classification head) by its full dotted name, and has the kind
`EXTRA_KIND` where kinds are compared (frozen kinds, cohort stacking).

*Slot* tensors hold one row per routed expert slot: ``lora_a`` [k, r, d_in] and ``lora_b`` [k, d_out, r] always,
``router`` [k, d_in] only with the linear router (the embedding router's ``router`` is the token projection W_t
[r, d_in], shared by all experts). A state's slot tensors may hold fewer rows (k) than the module has slots: they
fill slots 0..k-1.
"""

from __future__ import annotations

from collections.abc import Container

__all__ = [
    "EXTRA_KIND",
    "MASK_KIND",
    "MOLE_KINDS",
    "ROUTED_KINDS",
    "kind_of",
    "is_slot_kind",
    "slot_kinds",
    "split_key",
    "state_key",
]

MOLE_KINDS = ("lora_a", "lora_b", "router", "shared_a", "shared_b")  # a MoLE module's tensors, in state order
MASK_KIND = "active_experts"  # a MoLE module's bool mask of active slots (in `fedamole.mole_state_dict`)
ROUTED_KINDS = ("lora_a", "lora_b")  # slot tensors whatever the router
EXTRA_KIND = "extra"  # the kind of a tensor outside the MoLE modules


def state_key(module: str, kind: str) -> str:
    """The key of tensor `kind` of MoLE module `module`."""
    return f"{module}.{kind}"


def split_key(key: str) -> tuple[str, str]:
    """(module, kind) of a key, split at its last dot; a key without a dot has the module ""."""
    module, _, kind = key.rpartition(".")
    return module, kind


def slot_kinds(router: str) -> tuple[str, ...]:
    """The slot tensor kinds of a module with `router` ("embedding" or "linear")."""
    return ROUTED_KINDS + (("router",) if router == "linear" else ())


def is_slot_kind(kind: str, router: str) -> bool:
    """Whether tensor `kind` of a module with `router` holds one row per expert slot."""
    return kind in slot_kinds(router)


def kind_of(key: str, modules: Container[str]) -> tuple[str, str]:
    """(MoLE module, kind) for a MoLE tensor's key (its module in `modules`, its kind in `MOLE_KINDS`); (key,
    `EXTRA_KIND`) for any other key."""
    module, kind = split_key(key)
    if module in modules and kind in MOLE_KINDS:
        return module, kind
    return key, EXTRA_KIND
