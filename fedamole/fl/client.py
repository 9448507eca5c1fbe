"""Client side: one round of local work as a function of (workload, task, client data, seed) -> result.

A *state* is a flat dict ``{parameter name: tensor}`` over the model's MoLE parameters and extra trainable modules
(the classification head), keyed as `fedamole.adapter_state` lays out. Slot tensors (``<module>.lora_a``
[k, r, d_in], ``<module>.lora_b`` [k, d_out, r], and ``<module>.router`` [k, d_in] for the linear router) fill
slots 0..k-1 of the module and mark exactly those slots active. Parameters absent from the state stay as they are
and are not trained.

What goes down is a `fedamole.fl.protocol.ClientTask`, what comes up a `fedamole.fl.protocol.ClientResult`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

import fedamole
from fedamole.adapter_state import EXTRA_KIND, kind_of
from fedamole.data.scenarios import ClientData
from fedamole.fl.adapter_tensors import AdapterTensors, ModelTensors, extract_from, load_into, poison
from fedamole.fl.dp import dp_noise, privatize_stats
from fedamole.fl.protocol import OPTIMIZERS, ClientResult, ClientTask, EmbeddingStats


class SimulatedClientCrash(RuntimeError):
    """Raised by `client_update` when the payload injects a crash (fault "crash")."""


__all__ = [
    "SimulatedClientCrash",
    "client_update",
    "finish_client",
    "load_state",
    "extract_state",
    "embedding_stats",
    "dp_noise",
    "state_nbytes",
    "optimizer_weight_decay",
    "ADAMW_WEIGHT_DECAY",
]

ADAMW_WEIGHT_DECAY = 0.01  # PyTorch's AdamW default, which FDLoRA's authors kept


def optimizer_weight_decay(optimizer: str) -> float:
    """Local optimiser of a task -> its decoupled weight decay: "adam" 0 (Adam), "adamw" 0.01 (AdamW)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"ClientTask.optimizer must be 'adam' or 'adamw', got {optimizer!r}")
    return ADAMW_WEIGHT_DECAY if optimizer == "adamw" else 0.0


@torch.no_grad()
def load_state(model, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into ``model``; routed-expert tensors fill the first k slots and set the active mask (slots k..
    zeroed), see `fedamole.fl.adapter_tensors.load_into`."""
    load_into(ModelTensors(model), state)


@torch.no_grad()
def extract_state(model, keys, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies (on CPU) of the parameters named by ``keys``, slot tensors cut to the size they have in ``like``."""
    return extract_from(ModelTensors(model), keys, like)


def _trainable(model, keys, frozen) -> list[Tensor]:
    modules = fedamole.mole_modules(model)
    params = dict(model.named_parameters())
    out, seen = [], set()
    for key in keys:
        mod, kind = kind_of(key, modules)
        if kind in frozen:
            continue
        p = params[key] if kind == EXTRA_KIND else getattr(modules[mod], kind)
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def embedding_stats(workload, examples, batch_size: int = 16) -> EmbeddingStats:
    """SPEC §3 step 4 over the embedding set, per module: t = mean over tokens of W_t x (embedding router) or of x
    (linear router); e = mean over tokens of A_i x for each active slot i (embedding router only)."""
    model = workload.model
    modules = fedamole.mole_modules(model)
    sums: dict[str, list] = {name: [None, None, 0] for name in modules}
    state = {"mask": None}
    hooks = []

    def make_hook(name, m):
        def hook(_module, args):
            x = args[0].reshape(-1, m.in_features).float()[state["mask"].reshape(-1)]
            k = int(m.active_experts.sum())
            if m.config.router == "embedding":
                t = (x @ m.router.float().T).sum(0)
                e = torch.einsum("td,erd->er", x, m.lora_a[:k].float())
            else:
                t, e = x.sum(0), None
            acc = sums[name]
            acc[0] = t if acc[0] is None else acc[0] + t
            if e is not None:
                acc[1] = e if acc[1] is None else acc[1] + e
            acc[2] += x.shape[0]

        return hook

    for name, m in modules.items():
        hooks.append(m.register_forward_pre_hook(make_hook(name, m)))
    was_training = model.training
    model.eval()
    try:
        for batch in workload.batches(examples, batch_size):
            state["mask"] = batch["attention_mask"].bool()
            workload.forward_tokens(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = EmbeddingStats(t={}, e={})
    for name, (t, e, n) in sums.items():
        n = max(n, 1)
        out.t[name] = (t / n).cpu()
        if e is not None:
            out.e[name] = (e / n).cpu()
    return out


def state_nbytes(state) -> int:
    """Bytes of the tensors / arrays in a (nested) dict or `EmbeddingStats`."""
    if isinstance(state, EmbeddingStats):
        return state_nbytes(state.t) + state_nbytes(state.e)
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, np.ndarray):
        return int(state.nbytes)
    return 0


def client_update(
    workload, task: ClientTask, data: ClientData, seed: int, kind: str = "classification", choices=None
) -> ClientResult:
    """One client's round: load the task's state, train locally, evaluate, compute statistics, build the result.

    Fault injection (``task.fault``): "dropout" returns a dropped result without doing anything; "diverge" trains,
    then sets every tensor the client trains to NaN (its upload is then rejected by the server); "crash" raises
    `SimulatedClientCrash` half-way through local training (engines turn any exception into a failed result).
    """
    if task.fault == "dropout":
        return ClientResult.dropped()
    model = workload.model
    state = task.state
    load_state(model, state)
    torch.manual_seed(seed)
    steps = int(task.steps or 0)
    frozen = set(task.frozen)
    train_loss = float("nan")
    if steps > 0 and data.train:
        if task.lr is None:
            raise ValueError(f"ClientTask.lr must be set to train ({steps} local steps)")
        params = _trainable(model, state.keys(), frozen)
        decay = optimizer_weight_decay(task.optimizer)
        opt_cls = torch.optim.AdamW if decay else torch.optim.Adam
        opt = opt_cls(params, lr=float(task.lr), eps=1e-6, weight_decay=decay)
        clip = task.max_grad_norm
        # Only this round's trainable tensors need gradients (saves the backward of frozen adapters).
        adapters = [p for p in model.parameters() if p.requires_grad]
        train_ids = {id(p) for p in params}
        for p in adapters:
            p.requires_grad_(id(p) in train_ids)
        model.train()
        losses = []
        rng = np.random.default_rng(seed)
        try:
            batches = workload.batches(data.train, int(task.batch_size or 1), steps=steps, rng=rng)
            for step, batch in enumerate(batches):
                if task.fault == "crash" and step == steps // 2:
                    raise SimulatedClientCrash(f"injected crash at local step {step} of {steps}")
                loss = workload.loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, float(clip))
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            for p in adapters:
                p.requires_grad_(True)
        train_loss = float(np.mean(losses))
    if task.fault == "diverge":
        poison(ModelTensors(model), state, frozen)
        train_loss = math.nan
    return finish_client(workload, task, data, state, seed, train_loss, kind, choices)


def finish_client(
    workload,
    task: ClientTask,
    data: ClientData,
    state: dict[str, Tensor],
    seed: int,
    train_loss: float,
    kind: str,
    choices,
) -> ClientResult:
    """Everything after local training (the model holds the trained client): evaluation, embedding statistics
    (+ DP noise), and the result. Shared by every engine so that they build identical results."""
    model = workload.model
    model.eval()
    fusion_weights = None
    if task.fusion is not None:
        from fedamole.fl.fdlora import adafusion

        fusion = task.fusion
        fusion_weights = adafusion(
            workload,
            {k: state[k] for k in fusion.private},
            fusion,
            data.embed or data.train,
            int(task.batch_size or 1),
            seed,
        ).tolist()
    metric = workload.evaluate(data.test, kind, choices) if task.evaluate else None
    stats = None
    if task.stats:
        stats = embedding_stats(workload, data.embed or data.train)
        if task.dp_eta is not None:
            stats = privatize_stats(workload, stats, data.embed or data.train, task.dp_mechanism, task.dp_eta, seed + 1)
    return client_result(task, data, ModelTensors(model), state, metric, stats, train_loss, fusion_weights)


def client_result(
    task: ClientTask,
    data: ClientData,
    tensors: AdapterTensors,
    state: dict[str, Tensor],
    metric: float | None,
    stats: EmbeddingStats | None,
    train_loss: float,
    fusion_weights: list[float] | None = None,
) -> ClientResult:
    """A trained client's result: its upload and private state cut from ``tensors`` (the model, or its slice of a
    cohort's stack) as ``state`` shapes them, with the metric, statistics and training loss given."""
    return ClientResult(
        up=extract_from(tensors, task.upload, state),
        private=extract_from(tensors, task.keep, state),
        metric=metric,
        stats=stats,
        train_loss=train_loss,
        num_train=len(data.train),
        expert_ids={k: np.asarray(v).copy() for k, v in (task.expert_ids or {}).items()} or None,
        fusion_weights=fusion_weights,
    )
