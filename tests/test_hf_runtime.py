"""FedAMoLE models in the Hugging Face runtime, on CPU: deepcopy, gradient checkpointing, generate with the KV
cache, torch.compile and DDP (gloo). The Trainer and saving are in test_hf_training.py."""

import copy

import pytest
import torch
from hf_cases import llama_mole_config, lm_batch, mole_params, peft_llama, randomise_b
from test_models import tiny_llama

import fedamole
from fedamole import MoLEConfig

# --- 1. deepcopy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [None, True], ids=["plain", "reentrant-checkpointing"])
def test_deepcopy_after_a_training_forward_and_after_backward(reentrant):
    model = peft_llama(load_balance_coef=0.5)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    randomise_b(model)
    model.train()
    batch = lm_batch()
    out = model(**batch)
    before_backward = copy.deepcopy(model)  # routing tensors with autograd history must not be on the modules
    out.loss.backward()
    after_backward = copy.deepcopy(model)
    grads = {n: p.grad.clone() for n, p in mole_params(model).items()}

    for clone in (before_backward, after_backward):
        clone.zero_grad()
        again = clone(**batch)
        torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
        torch.testing.assert_close(again.loss, out.loss, rtol=0, atol=0)
        torch.testing.assert_close(again.aux_loss, out.aux_loss, rtol=0, atol=0)
        again.loss.backward()
        for name, param in mole_params(clone).items():
            torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-7)


# --- 2. Gradient checkpointing -------------------------------------------------------------------------------------


def _loss_and_grads(checkpointing, coef):
    model = peft_llama(load_balance_coef=coef)
    randomise_b(model)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    out = model(**lm_batch(), use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in mole_params(model).items()}


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


# --- 3. generate ---------------------------------------------------------------------------------------------------


def test_generate_with_and_without_kv_cache_agree():
    model = peft_llama()
    randomise_b(model, std=0.5)
    model.eval()
    batch = lm_batch(length=6, pad=0)
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


# --- 4. torch.compile ----------------------------------------------------------------------------------------------


def test_compile_inject_mole_model_one_graph_same_outputs():
    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4, dropout=0.0))
    randomise_b(model)
    model.train()
    batch = lm_batch()
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


def _training_peft_llama():
    """A PEFT Llama with non-zero experts and the aux loss on, in training mode, and its batch (no KV cache)."""
    model = peft_llama(load_balance_coef=1.0)
    randomise_b(model)
    model.train()
    return model, {**lm_batch(), "use_cache": False}


def test_compile_peft_model_one_graph_same_loss_aux_and_gradients():
    model, batch = _training_peft_llama()
    eager = model(**batch)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in mole_params(model).items()}
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
        torch.testing.assert_close(mole_params(model)[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_the_hooked_hf_model_fullgraph():
    """Regression: the tuner's hooks sit on the HF model; compiling that model (not the PeftModel) traces the hooks
    as their own frames, and the routing pre-hook used to keep a @contextmanager object alive across them, which
    Dynamo cannot do (fullgraph=True raised "reconstructing @contextmanager object")."""
    model, batch = _training_peft_llama()
    eager = model(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model.get_base_model(), backend="eager", fullgraph=True)
    out = compiled(**batch)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)


# --- 5. DDP (gloo, 2 processes) ------------------------------------------------------------------------------------


def _ddp_train(rank):
    """Two SGD steps of the PEFT tiny Llama under DDP on this rank's own data; the DDP wrapper dies on return."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(rank)  # different expert init per rank: DDP must broadcast rank 0's
    model = fedamole.get_mole_model(tiny_llama(), llama_mole_config(load_balance_coef=0.5))
    ddp = DistributedDataParallel(model)
    params = mole_params(model)
    initial = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    losses = []
    for step in range(2):
        out = ddp(**lm_batch(seed=100 * rank + step))  # different data per rank
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
