"""FedAMoLE as a PEFT method: creation, targets like PEFT, aux loss, save/load, disable/unload, config checks."""

import copy
import json

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from test_models import tiny_bert, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

import fedamole
from fedamole import MoLEConfig, MoLEPeftConfig
from fedamole.peft_tuner import MoLEPeftLayer


def _randomise_b(model, std=0.2):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b", "shared_b")):
                param.normal_(std=std)


def _adapted(model):
    return sorted(
        name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, MoLEPeftLayer)
    )


def _lora_adapted(base, **targets):
    lora = peft.get_peft_model(base, LoraConfig(r=2, **targets))
    return sorted(
        name.removeprefix("base_model.model.")
        for name, m in lora.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )


def test_get_mole_model_is_a_peft_model_with_only_experts_trainable():
    model = fedamole.get_mole_model(tiny_llama(), MoLEPeftConfig(num_experts=4, rank=4, task_type="CAUSAL_LM"))
    assert isinstance(model, peft.PeftModelForCausalLM)
    assert _adapted(model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b", "router", "shared_a", "shared_b"}
    expected = sum(p.numel() for n, p in model.named_parameters() if ".mole_experts." in n)
    assert model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize(
    "targets",
    [
        {"target_modules": ["self_attn.q_proj"]},
        {"target_modules": r".*layers\.0\..*(q|v)_proj"},
        {"target_modules": "all-linear"},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "down_proj"]},
        {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": r".*layers\.1\..*"},
    ],
)
def test_targets_follow_peft_semantics(targets):
    mole = fedamole.get_mole_model(tiny_llama(), MoLEPeftConfig(num_experts=2, rank=2, **targets))
    adapted = _adapted(mole)
    assert adapted, targets
    assert adapted == _lora_adapted(tiny_llama(), **targets)
    assert "lm_head" not in adapted


def test_gpt2_conv1d_is_adapted_and_starts_equal_to_the_base():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 97, (2, 7))
    expected = base(input_ids=ids).logits
    model = fedamole.get_mole_model(
        base, MoLEPeftConfig(num_experts=3, rank=4, dropout=0.0, target_modules=["c_attn", "c_fc"])
    )
    model.eval()
    assert len(_adapted(model)) == 4
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    _randomise_b(model)
    assert not torch.allclose(model(input_ids=ids).logits, expected)


def test_aux_loss_is_added_to_the_loss_and_trains_the_router():
    model = fedamole.get_mole_model(
        tiny_llama(), MoLEPeftConfig(num_experts=4, rank=4, dropout=0.0, load_balance_coef=0.5, task_type="CAUSAL_LM")
    )
    _randomise_b(model)
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    with fedamole.record_routing(model) as routing:
        again = model(input_ids=ids, attention_mask=mask)  # no labels: no loss, but the aux loss in training
    manual_aux = routing.load_balance_loss(token_mask=mask.bool())
    torch.testing.assert_close(out.aux_loss, manual_aux)
    torch.testing.assert_close(again.aux_loss, manual_aux)
    task = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + 0.5 * manual_aux)
    routers = [p for n, p in model.named_parameters() if n.endswith("router")]
    grads = torch.autograd.grad(out.loss, routers, retain_graph=True)
    manual = torch.autograd.grad(task + 0.5 * manual_aux, routers, retain_graph=True)
    task_only = torch.autograd.grad(task, routers)
    for g, m in zip(grads, manual):
        torch.testing.assert_close(g, m)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert any(not torch.allclose(g, t) for g, t in zip(grads, task_only)), "the aux loss must reach the router"


def test_no_aux_loss_work_in_eval_without_labels():
    model = fedamole.get_mole_model(tiny_llama(), MoLEPeftConfig(num_experts=2, rank=2))
    model.eval()
    out = model(input_ids=torch.randint(0, 97, (1, 5)))
    assert getattr(out, "aux_loss", None) is None


def test_save_pretrained_is_adapter_only_and_reloads_exactly(tmp_path):
    model = fedamole.get_mole_model(tiny_llama(), MoLEPeftConfig(num_experts=4, rank=4, task_type="CAUSAL_LM"))
    _randomise_b(model)
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, fedamole.MoLEExperts)).active_experts[1] = False
    model.eval()
    ids = torch.randint(0, 97, (2, 6))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FEDAMOLE" and config["num_experts"] == 4
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert isinstance(reloaded.peft_config["default"], MoLEPeftConfig)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_disable_adapter_unload_and_merge_refusal():
    base_logits_model = tiny_llama()
    ids = torch.randint(0, 97, (1, 6))
    expected = base_logits_model(input_ids=ids).logits
    model = fedamole.get_mole_model(tiny_llama(), MoLEPeftConfig(num_experts=2, rank=2))
    _randomise_b(model)
    model.eval()
    assert not torch.allclose(model(input_ids=ids).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="merge"):
        model.merge_and_unload()
    clone = copy.deepcopy(model)
    unloaded = model.unload()
    assert not any(isinstance(m, MoLEPeftLayer) for m in unloaded.modules())
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    torch.testing.assert_close(unloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert not torch.allclose(clone(input_ids=ids).logits, expected)


def test_modules_to_save_trains_and_saves_the_classifier(tmp_path):
    model = fedamole.get_mole_model(
        tiny_bert(), MoLEPeftConfig(num_experts=2, rank=2, modules_to_save=["classifier"], task_type="SEQ_CLS")
    )
    assert _adapted(model) == _lora_adapted(tiny_bert())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert trainable
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


def test_mole_config_converts_and_bad_fields_are_named():
    config = MoLEPeftConfig.from_mole_config(MoLEConfig(num_experts=3, rank=4, target_modules=("q_proj",)))
    assert config.num_experts == 3 and config.target_modules == {"q_proj"}
    assert config.to_mole_config() == MoLEConfig(num_experts=3, rank=4)
    for field, value in [("num_experts", 0), ("top_k", -1), ("router", "mlp"), ("alpha", float("inf"))]:
        with pytest.raises(ValueError, match=field):
            MoLEPeftConfig(**{field: value})
    with pytest.raises(TypeError, match="config"):
        fedamole.get_mole_model(tiny_llama(), LoraConfig())
