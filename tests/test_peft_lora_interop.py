"""PEFT LoRA interop: MoLE experts seeded from PEFT LoRA adapters and exported as them, checked against peft itself."""

import json
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama

import fedamole
from fedamole import MoLEConfig

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
ATOL = 1e-5  # fp32; the adapters below move the logits by > 1e-2


def peft_adapter(tmp_path, r=4, alpha=8, targets=("q_proj", "v_proj"), **options):
    """A PEFT LoRA model on tiny_llama() with random (non-zero) lora_B, saved to tmp_path/peft."""
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **options)
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), tmp_path / "peft"


def mole(make=tiny_llama, zero_routed=True, extra_trainable=(), **overrides):
    """MoLE injected into a fresh base; shared_b and (unless zero_routed) lora_b random so seeding must overwrite."""
    config = MoLEConfig(**{"num_experts": 3, "rank": 4, "alpha": 8.0, "dropout": 0.0, **overrides})
    model = fedamole.inject_mole(make(), config, extra_trainable=extra_trainable)
    with torch.no_grad():
        for module in fedamole.mole_modules(model).values():
            module.lora_b.zero_() if zero_routed else module.lora_b.normal_(std=0.2)
            if module.shared_b is not None:
                module.shared_b.normal_(std=0.2)
    return model


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before):
    state = model.state_dict()
    assert state.keys() == before.keys()
    for key, value in state.items():
        assert torch.equal(value, before[key]), key


def test_shared_expert_from_peft_reproduces_peft_logits(tmp_path):
    peft_model, folder = peft_adapter(tmp_path)
    model = mole()
    expected = logits(peft_model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-2  # the adapter really moves the output
    assert (logits(model) - expected).abs().max() > 1e-2
    assert fedamole.from_peft_lora(model, folder) is model
    for name, module in fedamole.mole_modules(model).items():
        assert torch.equal(module.shared_a, peft_layer(peft_model, name).lora_A["default"].weight), name
        assert torch.equal(module.shared_b, peft_layer(peft_model, name).lora_B["default"].weight), name
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=ATOL)


def test_from_peft_lora_needs_no_peft_import_and_reads_adapter_named_keys(tmp_path, monkeypatch):
    peft_model, folder = peft_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)  # older PEFT format: the adapter name inside the key
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, weights)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    model = fedamole.from_peft_lora(mole(), folder)
    monkeypatch.undo()
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("router", ["embedding", "linear"])
def test_routed_copies_equal_one_more_lora(tmp_path, shared, router):
    peft_model, folder = peft_adapter(tmp_path)
    model = mole(zero_routed=False, shared_expert=shared, router=router)
    next(iter(fedamole.mole_modules(model).values())).set_active_experts(torch.tensor([True, False, True]))
    fedamole.from_peft_lora(model, folder, routed=True)
    copies = 1 + shared  # the gates of the routed experts sum to 1, the shared expert has weight 1
    for name, module in fedamole.mole_modules(model).items():
        layer = peft_layer(peft_model, name)
        for slot in range(3):
            assert torch.equal(module.lora_a[slot], layer.lora_A["default"].weight), (name, slot)
            assert torch.equal(module.lora_b[slot], layer.lora_B["default"].weight), (name, slot)
        x = torch.randn(5, 3, module.in_features)
        with torch.no_grad():
            lora_delta = layer(x) - layer.base_layer(x)
            torch.testing.assert_close(module(x) - module.base(x), copies * lora_delta, rtol=0, atol=ATOL)
    with torch.no_grad():  # the whole model equals PEFT with every lora_B multiplied by `copies`
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(copies)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_mismatch_rescales_b(tmp_path, rslora):
    peft_model, folder = peft_adapter(tmp_path, r=4, alpha=8, use_rslora=rslora)
    model = mole(alpha=2.0)  # MoLE scaling 0.5; PEFT 8 / 4 = 2 (ratio 4) or 8 / sqrt(4) = 4 (ratio 8)
    fedamole.from_peft_lora(model, folder)
    ratio = 8.0 if rslora else 4.0
    for name, module in fedamole.mole_modules(model).items():
        torch.testing.assert_close(module.shared_b, ratio * peft_layer(peft_model, name).lora_B["default"].weight)
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=0, atol=ATOL)


def _load_in_peft(base, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(base, folder).eval()
    assert not [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    result = peft_model.load_adapter(folder, adapter_name="again")
    assert not result.missing_keys and not result.unexpected_keys, result
    peft_model.set_adapter("default")
    return peft_model


def test_to_peft_lora_llama_loads_in_peft_with_equal_logits(tmp_path):
    model = mole()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # routed experts are zero: nothing to warn about
        folder = fedamole.to_peft_lora(model, tmp_path / "out")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert (config["target_modules"], config["task_type"], config["modules_to_save"]) == (
        ["q_proj", "v_proj"],
        "CAUSAL_LM",
        None,
    )
    assert sorted(load_file(folder / "adapter_model.safetensors")) == sorted(
        f"base_model.model.{name}.lora_{part}.weight" for name in fedamole.mole_modules(model) for part in "AB"
    )
    expected = logits(model)
    assert (expected - logits(tiny_llama())).abs().max() > 1e-2
    peft_model = _load_in_peft(tiny_llama(), folder)
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=ATOL)

    again = fedamole.from_peft_lora(mole(), folder)  # and back: the shared experts round-trip bit-exactly
    for name, module in fedamole.mole_modules(model).items():
        assert torch.equal(fedamole.mole_modules(again)[name].shared_a, module.shared_a), name
        assert torch.equal(fedamole.mole_modules(again)[name].shared_b, module.shared_b), name


@pytest.mark.parametrize("extra_trainable", [["classifier"], []])
def test_to_peft_lora_bert_exports_the_head(tmp_path, extra_trainable):
    model = mole(tiny_bert, extra_trainable=extra_trainable)  # PEFT's SEQ_CLS saves the classifier either way
    with torch.no_grad():
        model.classifier.weight.normal_(std=0.5)
    folder = fedamole.to_peft_lora(model, tmp_path / "out", base_model_name_or_path="tiny-bert")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["task_type"], config["target_modules"]) == ("SEQ_CLS", ["query", "value"])
    assert config["base_model_name_or_path"] == "tiny-bert" and "classifier" in config["modules_to_save"]
    expected = logits(model)
    assert (expected - logits(tiny_bert())).abs().max() > 1e-2
    torch.testing.assert_close(logits(_load_in_peft(tiny_bert(), folder)), expected, rtol=0, atol=ATOL)
    back = fedamole.from_peft_lora(mole(tiny_bert), folder)  # the head comes back as PEFT's modules_to_save
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=ATOL)


def test_to_peft_lora_warns_about_routed_experts_and_refuses_what_it_cannot_export(tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="routed experts"):
        fedamole.to_peft_lora(mole(zero_routed=False), tmp_path / "a")
    with pytest.raises(ValueError, match="shared_expert=False"):
        fedamole.to_peft_lora(mole(shared_expert=False), tmp_path / "b")
    with pytest.raises(ValueError, match="inject_mole"):
        fedamole.to_peft_lora(tiny_llama(), tmp_path / "c")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        fedamole.to_peft_lora(mole(), tmp_path / "d")
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def config_change(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def weights_change(change):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        save_file(change(load_file(path)), path)

    return edit


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])


def _nan_in_last_b(tensors):
    last = sorted(k for k in tensors if "lora_B" in k)[-1]
    return {**tensors, last: torch.full_like(tensors[last], float("nan"))}


def _add_k_proj(tensors):
    return {**tensors, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)}


def _narrow_b(tensors):
    return {k: v[:, :3].contiguous() if "lora_B" in k else v for k, v in tensors.items()}


def _second_adapter(tensors):
    return {k.replace("0.self_attn.q_proj.lora_A", "0.self_attn.q_proj.lora_A.other"): v for k, v in tensors.items()}


BROKEN = {  # name: (how to break a good adapter folder, MoLE overrides, expected error, message)
    "rank": (None, {"rank": 8}, ValueError, r"r=4 does not match MoLEConfig.rank=8"),
    "missing module": (None, {"target_modules": ("q_proj", "k_proj", "v_proj")}, ValueError, r"lacks.*k_proj"),
    "extra module": (weights_change(_add_k_proj), {}, ValueError, r"k_proj.*not MoLE modules"),
    "no shared expert": (None, {"shared_expert": False}, ValueError, "shared_expert=False"),
    "use_dora": (config_change(use_dora=True), {}, ValueError, "use_dora"),
    "fan_in_fan_out": (config_change(fan_in_fan_out=True), {}, ValueError, "fan_in_fan_out"),
    "bias": (config_change(bias="all"), {}, ValueError, "bias='all'"),
    "lora_bias": (config_change(lora_bias=True), {}, ValueError, "lora_bias"),
    "rank_pattern": (config_change(rank_pattern={"q_proj": 8}), {}, ValueError, "rank_pattern"),
    "alpha_pattern": (config_change(alpha_pattern={"v_proj": 32}), {}, ValueError, "alpha_pattern"),
    "pissa": (config_change(init_lora_weights="pissa"), {}, ValueError, "init_lora_weights"),
    "not lora": (config_change(peft_type="IA3"), {}, ValueError, "peft_type 'IA3'"),
    "no folder": (shutil.rmtree, {}, FileNotFoundError, "adapter_config.json not found"),
    "no weights": (
        lambda f: (f / "adapter_model.safetensors").unlink(),
        {},
        FileNotFoundError,
        "safetensors not found",
    ),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), {}, ValueError, "not valid JSON"),
    "truncated": (_truncate, {}, ValueError, "corrupted or truncated"),
    "nan": (weights_change(_nan_in_last_b), {}, ValueError, "finite"),
    "wrong shape": (weights_change(_narrow_b), {}, ValueError, r"shape \[32, 3\]"),
    "two adapters": (weights_change(_second_adapter), {}, ValueError, "mixes adapters"),
    "unknown tensor": (
        weights_change(lambda t: {**t, "base_model.model.head.weight": torch.zeros(2)}),
        {},
        ValueError,
        "base_model.model.head.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_errors_name_the_problem_and_leave_the_model_unchanged(tmp_path, case):
    breaker, overrides, error, message = BROKEN[case]
    _, folder = peft_adapter(tmp_path)
    if breaker is not None:
        breaker(folder)
    model = mole(zero_routed=False, **overrides)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        fedamole.from_peft_lora(model, folder, routed=case == "nan")
    assert_unchanged(model, before)


def test_peft_mole_model_round_trips_with_peft_lora(tmp_path):
    """The PEFT-method path (`get_mole_model`): seeded from a LoRA adapter it computes that LoRA, and exports it."""
    lora_model, folder = peft_adapter(tmp_path)
    model = fedamole.get_mole_model(
        tiny_llama(), fedamole.MoLEPeftConfig(num_experts=3, rank=4, alpha=8.0, dropout=0.0, task_type="CAUSAL_LM")
    )
    model.eval()
    assert (logits(model) - logits(lora_model)).abs().max() > 1e-2
    fedamole.from_peft_lora(model, folder)
    torch.testing.assert_close(logits(model), logits(lora_model), rtol=0, atol=ATOL)
    exported = fedamole.to_peft_lora(model, tmp_path / "export")
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), exported).eval()
    torch.testing.assert_close(logits(reloaded), logits(lora_model), rtol=0, atol=ATOL)
