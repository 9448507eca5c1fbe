"""`CohortEngine`: a round's clients trained together, one forward/backward per local step (SPEC §4).

Clients in a round are independent given the server state, and the backbone is frozen and shared, so S clients'
local steps can run as one step of a model whose trainable tensors are stacked along a leading client dimension:

* every `MoLELinear` gets client-stacked experts (lora_a [S, E, r, d_in], ..., active_experts [S, E]) and serves
  all S clients' micro-batches, block s of the batch's rows being client s's, in one `mole_lora` call;
* the extra trainable modules (a classification head) are evaluated per client block with ``torch.func.vmap``
  over their stacked parameters;
* the loss is the SUM over clients of each client's own loss (its task loss over its own rows, plus its load
  balance over its real tokens), so one backward gives every client exactly its own gradient;
* gradients are clipped per client (`clip_grad_norm_per_client`) and `StackedAdam` is one Adam per client
  (own step count, own learning rate); a client with fewer local steps leaves the cohort through Adam's ``active``
  mask (its rows still run, weighted 0, because the client blocks must stay equal).

Batches are right-padded to a common width; with causal or masked attention the real tokens' outputs do not
change, so with dropout 0 the result equals `SequentialEngine` up to floating-point rounding: same uploads,
metrics and private states. With dropout > 0 (MoLE dropout or the backbone's own), masks are drawn for the
whole cohort at once and cannot match the sequential draws: results are statistically equivalent, not equal.

Clients are grouped into cohorts of identical "shape" (same state keys, frozen kinds, batch size and clipping) in
client order, at most ``cohort_size`` per cohort (0 = no limit). Everything that is not local training — loading,
evaluation, embedding statistics, DP noise, building the upload — runs per client, in client order, through the
same helpers as `fedamole.fl.client.client_update`. Eval-only payloads, injected faults, clients without training
data, singleton cohorts and models the stacked path cannot handle take the sequential path, and a cohort whose
training raises falls back to one client at a time (each client's error reported as in the sequential engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

import fedamole
from fedamole.adapter_state import EXTRA_KIND, MASK_KIND, MOLE_KINDS, kind_of, state_key
from fedamole.fl.client import NOT_SCORED, client_update, finish_client, load_state, optimizer_weight_decay
from fedamole.fl.engine import Engine, client_seed, run_client_safely
from fedamole.fl.protocol import ClientResult, ClientTask
from fedamole.optim import StackedAdam, clip_grad_norm_per_client

__all__ = ["CohortEngine", "train_cohort"]


class _NotStackable(Exception):
    """The stacked path cannot represent this cohort (e.g. a trainable tensor outside MoLE and the head)."""


class _StackedModule(nn.Module):
    """Runs ``inner`` once per client block of the input's leading dimension, each block with its own parameters
    (``stacked``: {parameter name: [S, ...]}); a classification head trained per client inside a cohort."""

    def __init__(self, inner: nn.Module, stacked: dict[str, Tensor], num_clients: int) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered: the stacked tensors replace its parameters
        self.stacked, self.num_clients = stacked, num_clients

    def forward(self, x: Tensor) -> Tensor:
        xs = x.reshape(self.num_clients, x.shape[0] // self.num_clients, *x.shape[1:])
        out = vmap(lambda p, xb: functional_call(self.inner, p, (xb,)))(self.stacked, xs)
        return out.reshape(x.shape[0], *out.shape[2:])


def _kind_of(key: str, modules: dict, extra: Sequence[str]) -> tuple[str, str]:
    """(owner, kind) of a state key: a MoLE module and its tensor kind, or an extra module and "extra"."""
    mod, kind = kind_of(key, modules)
    if kind != EXTRA_KIND:
        return mod, kind
    owner = next((e for e in extra if key.startswith(e + ".")), None)
    if owner is None:
        raise _NotStackable(f"state key {key!r} is neither a MoLE tensor nor in an extra trainable module")
    return owner, EXTRA_KIND


def _snapshot(model, modules: dict, extra: Sequence[str]) -> dict[str, Tensor]:
    """Detached copies of every tensor that gets stacked (all MoLE tensors and masks, the extra modules)."""
    out = {}
    for name, m in modules.items():
        for kind in MOLE_KINDS:
            value = getattr(m, kind)
            if value is not None:
                out[state_key(name, kind)] = value.detach().clone()
        out[state_key(name, MASK_KIND)] = m.active_experts.clone()
    for name in extra:
        for key, p in model.get_submodule(name).named_parameters():
            out[f"{name}.{key}"] = p.detach().clone()
    return out


def _stack_states(model, payloads: Sequence[ClientTask], modules: dict, extra: Sequence[str]):
    """(trainable names, stacked tensors {name: [S, ...]}, leaves {name: Parameter}) of S clients' starting states."""
    states = [{**p.private, **p.down} for p in payloads]
    frozen = set(payloads[0].frozen)
    trainable = set()
    for key in states[0]:
        owner, kind = _kind_of(key, modules, extra)
        if kind not in frozen:
            trainable.add(state_key(owner, kind) if kind != EXTRA_KIND else key)
    # Each client's starting tensors, exactly as `load_state` would put them in the single model.
    snaps = []
    for state in states:
        load_state(model, state)
        snaps.append(_snapshot(model, modules, extra))
    stacked = {name: torch.stack([s[name] for s in snaps]) for name in snaps[0]}
    del snaps
    # One Parameter per stacked tensor: the modules use it, autograd fills its .grad, the optimizer updates it.
    leaves = {
        name: nn.Parameter(t, requires_grad=name in trainable)
        for name, t in stacked.items()
        if not name.endswith("." + MASK_KIND)
    }
    return trainable, stacked, leaves


def _install_stacked(model, modules: dict, extra: Sequence[str], stacked: dict, leaves: dict, num: int, saved: list):
    """Put the stacked tensors in the model (MoLE tensors and masks, extra modules wrapped in `_StackedModule`),
    appending to ``saved`` every (owner, attribute, old value) as it goes so that the caller can restore them."""
    for name, m in modules.items():
        for kind in MOLE_KINDS:
            if getattr(m, kind) is not None:
                saved.append((m, kind, getattr(m, kind)))
                setattr(m, kind, leaves[state_key(name, kind)])
        saved.append((m, MASK_KIND, m.active_experts))
        m.active_experts = stacked[state_key(name, MASK_KIND)]
    for name in extra:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = getattr(parent, leaf)
        head = {key: leaves[f"{name}.{key}"] for key, _ in inner.named_parameters()}
        saved.append((parent, leaf, inner))
        setattr(parent, leaf, _StackedModule(inner, head, num))


# What `train_cohort` has always passed to `evaluate_per_client` as the task kind: a loop variable over the tensor
# kinds used to shadow its ``kind`` argument there, so `evaluate_per_client` (which scores only "classification")
# declines and every client is scored afterwards by `finish_client`. Kept so that splitting the function changes no
# result; passing ``kind`` instead would turn the stacked scoring on.
_STACKED_EVAL_KIND = MOLE_KINDS[-1]


def train_cohort(
    workload,
    payloads: Sequence[ClientTask],
    datas: Sequence,
    seeds: Sequence[int],
    evaluate: bool = False,
    kind: str = "classification",
    choices=None,
) -> list[dict]:
    """Train S clients' local steps together; returns per client ``{"trained": {name: tensor}, "train_loss"}``,
    plus ``"metric"`` when ``evaluate`` and the workload can score stacked clients (`evaluate_per_client`).

    ``trained`` holds the client's trainable tensors after training (whole slot tensors, like the model's own
    parameters); the model itself is left with its single-client parameters (holding the last client's loaded
    state). All payloads must share state keys, frozen kinds, batch size and max_grad_norm.
    """
    model = workload.model
    modules = fedamole.mole_modules(model)
    extra = list(getattr(model, "fedamole_extra_trainable", []))
    num = len(payloads)
    trainable, stacked, leaves = _stack_states(model, payloads, modules, extra)
    params = [leaves[name] for name in sorted(trainable)]
    if not params:
        raise _NotStackable("nothing to train (every state tensor is frozen)")
    steps = [int(p.steps) for p in payloads]
    opt = StackedAdam(
        params,
        num,
        lr=[float(p.lr) for p in payloads],
        eps=1e-6,
        weight_decay=optimizer_weight_decay(payloads[0].optimizer),
    )
    saved: list[tuple[nn.Module, str, object]] = []
    try:
        _install_stacked(model, modules, extra, stacked, leaves, num, saved)
        batch_size, clip = int(payloads[0].batch_size or 1), payloads[0].max_grad_norm
        losses = _run_steps(workload, opt, datas, seeds, steps, batch_size, clip)
        metrics = None
        if evaluate and hasattr(workload, "evaluate_per_client"):
            # Scored while the trained experts are still stacked: one forward serves every client's test rows.
            model.eval()
            metrics = workload.evaluate_per_client([d.test for d in datas], _STACKED_EVAL_KIND, choices)
        out = [
            {
                "trained": {name: leaves[name][s].detach().clone() for name in trainable},
                "train_loss": float(np.mean(losses[s])),
            }
            for s in range(num)
        ]
        for s, metric in enumerate(metrics or []):
            if payloads[s].evaluate:
                out[s]["metric"] = metric
        return out
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def _run_steps(workload, opt: StackedAdam, datas, seeds, steps: list[int], batch_size: int, clip) -> list[list]:
    """The local steps of a cohort; returns each client's per-step losses."""
    model, num = workload.model, len(steps)
    # Same data order as the sequential client: its own numpy generator seeded with its client seed.
    iters = [
        workload.batches(d.train, batch_size, steps=n, rng=np.random.default_rng(seed))
        for d, n, seed in zip(datas, steps, seeds)
    ]
    # Deterministic dropout draws (they cannot equal the sequential ones anyway, see the module docstring).
    torch.manual_seed(seeds[0])
    model.train()
    last: list[dict | None] = [None] * num
    losses: list[list[float]] = [[] for _ in range(num)]
    for step in range(max(steps)):
        active = torch.tensor([n > step for n in steps])
        for s in range(num):
            if active[s]:
                last[s] = next(iters[s])
        # A finished client's rows repeat its last batch (blocks must stay equal) with weight 0.
        batch = workload.merge_batches(last)
        per_client = workload.client_losses(batch, num)
        loss = (per_client * active.to(per_client.device, per_client.dtype)).sum()
        opt.zero_grad()
        loss.backward()
        if clip:
            clip_grad_norm_per_client(opt.params, float(clip), num)
        opt.step(active)
        values = per_client.detach().cpu().tolist()
        for s in range(num):
            if active[s]:
                losses[s].append(values[s])
    return losses


def _finish(
    workload,
    payload: ClientTask,
    data,
    seed: int,
    trained: dict[str, Tensor],
    train_loss: float,
    kind: str,
    choices,
    metric=NOT_SCORED,
) -> ClientResult:
    """Everything after local training, for one client, exactly as `client_update` does it."""
    model = workload.model
    state = {**payload.private, **payload.down}
    load_state(model, state)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in trained.items():
            params[name].copy_(value)
    # Leaves the global RNG where the sequential client leaves it (dropout 0: nothing drawn while training).
    torch.manual_seed(seed)
    return finish_client(workload, payload, data, state, seed, train_loss, kind, choices, metric)


def _shape(payload: ClientTask) -> tuple:
    """Clients whose payloads have the same shape can share a cohort."""
    state_keys = sorted({**payload.private, **payload.down})
    return (
        tuple(state_keys),
        tuple(sorted(payload.frozen)),
        int(payload.batch_size or 1),
        payload.max_grad_norm or None,
        payload.optimizer,
    )


class CohortEngine(Engine):
    """Trains a round's clients in cohorts, one forward/backward per local step (see the module docstring).

    Option ``cohort_size``: at most this many clients per cohort (0 = all clients of the same shape at once);
    smaller cohorts bound memory (activations and stacked tensors grow linearly with the cohort).
    """

    name = "cohort"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.options.get("cohort_size") or 0
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cohort_size must be an int >= 0 (0 = all clients), got {size!r}")
        self.cohort_size = size
        self._workload = None
        # Per run: how many clients trained in cohorts, and why a cohort fell back to the sequential path.
        self.report: dict = {"cohorts": 0, "cohort_clients": 0, "fallbacks": []}

    @property
    def workload(self):
        if self._workload is None:
            self._workload = self.workload_factory()
        return self._workload

    def cohorts(self, payloads: Sequence[ClientTask]) -> tuple[list[list[int]], list[int]]:
        """(cohorts of client indices trained together, clients that take the sequential path)."""
        sc = self.scenario
        groups: dict[tuple, list[int]] = {}
        alone = []
        for c, p in enumerate(payloads):
            if p.fault is not None or int(p.steps or 0) <= 0 or not sc.clients[c].train:
                alone.append(c)
            else:
                groups.setdefault(_shape(p), []).append(c)
        size = self.cohort_size or len(payloads)
        cohorts = []
        for members in groups.values():
            for i in range(0, len(members), size):
                chunk = members[i : i + size]
                if len(chunk) > 1:
                    cohorts.append(chunk)
                else:
                    alone.extend(chunk)
        return cohorts, sorted(alone)

    def run(self, payloads: Sequence[ClientTask], round_idx: int) -> list[ClientResult]:
        sc, wl = self.scenario, self.workload
        seeds = [client_seed(self.seed, round_idx, c) for c in range(len(payloads))]
        cohorts, _ = self.cohorts(payloads)
        trained: dict[int, dict] = {}
        self.report = {"cohorts": 0, "cohort_clients": 0, "fallbacks": []}
        for members in tqdm(cohorts, desc=f"round {round_idx} cohorts", leave=False, disable=not self.progress):
            try:
                results = train_cohort(
                    wl,
                    [payloads[c] for c in members],
                    [sc.clients[c] for c in members],
                    [seeds[c] for c in members],
                    evaluate=any(payloads[c].evaluate for c in members),
                    kind=sc.kind,
                    choices=sc.choices,
                )
            except Exception as exc:  # noqa: BLE001 - the sequential path then reproduces (or reports) each client
                self.report["fallbacks"].append({"clients": members, "error": f"{type(exc).__name__}: {exc}"})
                continue
            trained.update(zip(members, results))
            self.report["cohorts"] += 1
            self.report["cohort_clients"] += len(members)
        out = []
        for c, payload in enumerate(payloads):
            if c in trained:
                t = trained.pop(c)
                out.append(
                    run_client_safely(
                        lambda c=c, payload=payload, t=t: _finish(
                            wl,
                            payload,
                            sc.clients[c],
                            seeds[c],
                            t["trained"],
                            t["train_loss"],
                            sc.kind,
                            sc.choices,
                            t.get("metric", NOT_SCORED),
                        )
                    )
                )
            else:
                out.append(
                    run_client_safely(
                        lambda c=c, payload=payload: client_update(
                            wl, payload, sc.clients[c], seeds[c], kind=sc.kind, choices=sc.choices
                        )
                    )
                )
        return out
