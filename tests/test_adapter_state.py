"""`fedamole.adapter_state`: the one module that knows the adapter-state key layout."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fedamole
from fedamole.adapter_state import (
    EXTRA_KIND,
    MASK_KIND,
    MOLE_KINDS,
    ROUTED_KINDS,
    is_slot_kind,
    kind_of,
    slot_kinds,
    split_key,
    state_key,
)

ROOT = Path(__file__).resolve().parents[1]


def test_keys_split_and_build_back():
    assert state_key("model.layers.0.self_attn.q_proj", "lora_a") == "model.layers.0.self_attn.q_proj.lora_a"
    assert split_key("model.layers.0.self_attn.q_proj.lora_a") == ("model.layers.0.self_attn.q_proj", "lora_a")
    assert split_key("bias") == ("", "bias")
    for kind in (*MOLE_KINDS, MASK_KIND):
        assert split_key(state_key("a.b", kind)) == ("a.b", kind)


@pytest.mark.parametrize(
    "router, slots",
    [("embedding", ("lora_a", "lora_b")), ("linear", ("lora_a", "lora_b", "router"))],
)
def test_slot_kinds_depend_on_the_router(router, slots):
    assert slot_kinds(router) == slots
    assert [k for k in MOLE_KINDS if is_slot_kind(k, router)] == list(slots)
    assert set(ROUTED_KINDS) <= set(slots)
    assert not is_slot_kind("shared_a", router) and not is_slot_kind(MASK_KIND, router)


def test_kind_of_tells_mole_tensors_from_extra_ones():
    modules = {"enc.query", "enc.value"}
    assert kind_of("enc.query.router", modules) == ("enc.query", "router")
    assert kind_of("classifier.weight", modules) == ("classifier.weight", EXTRA_KIND)
    assert kind_of("enc.key.lora_a", modules) == ("enc.key.lora_a", EXTRA_KIND)  # not a MoLE module
    assert kind_of("enc.query.base.weight", modules) == ("enc.query.base.weight", EXTRA_KIND)


def test_the_layout_matches_the_models_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    fedamole.inject_mole(model, fedamole.MoLEConfig(num_experts=3, rank=2, target_modules=["0"]))
    state = fedamole.mole_state_dict(model)
    assert sorted(state) == sorted(state_key("0", k) for k in (*MOLE_KINDS, MASK_KIND))
    module = fedamole.mole_modules(model)["0"]
    for key, value in state.items():
        _, kind = split_key(key)
        if is_slot_kind(kind, module.config.router):
            assert value.shape[0] == module.config.num_experts, key


def _kind_tuples(path: Path) -> list[str]:
    """Literal tuples/lists/sets of two or more MoLE tensor kinds in a module (a copy of the layout)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in MOLE_KINDS]
            if len(names) >= 2:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {names}")
    return out


def test_no_other_module_spells_out_the_kinds():
    # The layer itself declares its parameters; everything that reads states goes through fedamole.adapter_state.
    allowed = {ROOT / "fedamole" / "adapter_state.py", ROOT / "fedamole" / "layers.py"}
    copies = [hit for p in sorted((ROOT / "fedamole").rglob("*.py")) if p not in allowed for hit in _kind_tuples(p)]
    assert not copies, "use fedamole.adapter_state instead of:\n" + "\n".join(copies)
    assert _kind_tuples(ROOT / "fedamole" / "adapter_state.py"), "the scan must see the layout's own tuples"
