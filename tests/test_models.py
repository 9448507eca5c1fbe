"""MoLE inside Hugging Face models (random-init tiny Llama and BERT): inject, train step, save/load."""

import json

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama

import fedamole
from fedamole import MoLEConfig, MoLELinear


def _perturb_experts(model):
    with torch.no_grad():
        for module in fedamole.mole_modules(model).values():
            module.lora_b.normal_(std=0.1)
            module.shared_b.normal_(std=0.1)


def test_llama_injection_targets_q_and_v():
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4))
    names = sorted(fedamole.mole_modules(model))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert model.fedamole_config.target_modules == ("q_proj", "v_proj")


def test_bert_injection_targets_query_and_value():
    model = fedamole.inject_mole(tiny_bert(), MoLEConfig(num_experts=2), extra_trainable=["classifier"])
    leaves = {n.rsplit(".", 1)[-1] for n in fedamole.mole_modules(model)}
    assert leaves == {"query", "value"}
    assert model.classifier.weight.requires_grad
    assert "classifier.weight" in fedamole.mole_state_dict(model)


def test_llama_train_step_only_mole_params_get_gradients():
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4))
    _perturb_experts(model)
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    with fedamole.record_routing(model) as routing:
        out = model(input_ids=ids, labels=ids)
    assert len(routing.calls) == 4
    loss = out.loss + model.fedamole_config.load_balance_coef * routing.load_balance_loss()
    loss.backward()
    for name, param in model.named_parameters():
        is_mole = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), MoLELinear) and ".base." not in name
        if is_mole:
            assert param.requires_grad and param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert routing.load_balance_loss().item() > 0


def test_bert_forward_backward():
    model = fedamole.inject_mole(
        tiny_bert(), MoLEConfig(num_experts=3, router="linear"), extra_trainable=["classifier"]
    )
    model.train()
    out = model(input_ids=torch.randint(0, 97, (3, 7)), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.bert.embeddings.word_embeddings.weight.grad is None


def test_no_matching_targets_lists_the_linear_names():
    with pytest.raises(ValueError, match="k_proj"):
        fedamole.inject_mole(tiny_llama(), MoLEConfig(target_modules=("wq",)))
    with pytest.raises(ValueError, match="already"):
        fedamole.inject_mole(fedamole.inject_mole(tiny_llama(), MoLEConfig()), MoLEConfig())
    with pytest.raises(ValueError, match="extra_trainable"):
        fedamole.inject_mole(tiny_bert(), MoLEConfig(), extra_trainable=["head_that_is_not_there"])


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_save_load_round_trip_is_exact(tmp_path, make):
    model = fedamole.inject_mole(make(), MoLEConfig(num_experts=3, rank=4))
    _perturb_experts(model)
    first = next(iter(fedamole.mole_modules(model).values()))
    first.set_active_experts(torch.tensor([True, False, True]))
    ids = torch.randint(0, 97, (2, 6))
    expected = model(input_ids=ids).logits
    fedamole.save_mole(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "mole_config.json").read_text())
    assert meta["config"]["num_experts"] == 3

    fresh = make()  # same seed -> same backbone; MoLE weights come from the file
    fedamole.load_mole(fresh, tmp_path / "adapter")
    for key, value in fedamole.mole_state_dict(model).items():
        assert torch.equal(fedamole.mole_state_dict(fresh)[key], value), key
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=0, atol=0)

    again = fedamole.inject_mole(make(), MoLEConfig(num_experts=3, rank=4))  # already injected: plain load
    fedamole.load_mole(again, tmp_path / "adapter")
    torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_load_errors_leave_the_model_untouched(tmp_path):
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=3, rank=4))
    fedamole.save_mole(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        fedamole.load_mole(tiny_llama(), tmp_path / "missing")
    other = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=2, rank=4))
    with pytest.raises(ValueError, match="num_experts"):
        fedamole.load_mole(other, tmp_path / "a")

    weights = tmp_path / "a" / "mole.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    plain = tiny_llama()
    with pytest.raises(ValueError, match="truncated"):
        fedamole.load_mole(plain, tmp_path / "a")
    assert not fedamole.mole_modules(plain)

    target = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=3, rank=4))
    before = {k: v.clone() for k, v in fedamole.mole_state_dict(target).items()}
    bad = {k: v.clone() for k, v in before.items()}
    bad[sorted(bad)[-1]] = torch.full_like(bad[sorted(bad)[-1]], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        fedamole.load_mole_state_dict(target, bad)
    bad = dict(before)
    bad.pop(sorted(bad)[0])
    with pytest.raises(ValueError, match="missing keys"):
        fedamole.load_mole_state_dict(target, bad)
    for key, value in fedamole.mole_state_dict(target).items():
        assert torch.equal(value, before[key])


def test_gpt2_conv1d_inject_all_linear_starts_equal_and_trains():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 97, (2, 7))
    expected = model(input_ids=ids).logits
    fedamole.inject_mole(model, MoLEConfig(num_experts=3, rank=4, dropout=0.0, target_modules="all-linear"))
    names = sorted(fedamole.mole_modules(model))
    assert "lm_head" not in names and {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    _perturb_experts(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    modules = fedamole.mole_modules(model).values()
    assert all(m.lora_b.grad is not None and m.lora_b.grad.abs().sum() > 0 for m in modules)
