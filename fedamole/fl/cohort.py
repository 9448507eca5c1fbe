"""`CohortEngine`: a round's clients run together, one forward per step for the whole cohort (SPEC §4).

Clients in a round are independent given the server state and the backbone is frozen and shared, so a cohort of S
clients runs as one model whose adapters are S clients' stacks (`ClientStack`, owned by the engine; the model's own
parameters are never touched) and whose batches hold every client's rows, split by a `SegmentPlan`:

* training: each step merges the batches of the clients that still have local steps (a client that finished, or
  crashed, leaves the batch: no dead rows), rows packed without padding where the backbone allows it
  (`fedamole.packing`; else right-padded to the step's widest); the loss is the SUM over
  clients of each client's own loss (its task loss over its rows, plus its load balance over its real tokens), so
  one backward gives every client exactly its own gradient; clipping is per client and `StackedAdam` is one Adam
  per client (own step count, own learning rate);
* evaluation (candidate-loss accuracy, classifier accuracy, generation) and the embedding statistics run for the
  whole cohort per forward (`fedamole.fl.cohort_eval`); so does the initial, evaluation-only round.

With dropout 0 the results equal `SequentialEngine` up to floating-point rounding: same uploads, metrics,
statistics and private states. With dropout > 0 (MoLE's or the backbone's), masks are drawn for the whole batch
and cannot match the sequential draws: results are statistically equivalent, not equal.

Cohorts: clients of identical "shape" (state keys, frozen kinds, batch size, clipping, optimiser) in client order,
sized by `CohortSizer` (a memory budget and a useful batch width; ``cohort_size`` caps it). What cannot be batched
runs per client through `fedamole.fl.client`: fault "dropout", FDLoRA's fusion and DP noise (both need the client
alone in the model; such clients still train in cohorts) and models whose trainable tensors are outside MoLE and the
extra modules. A cohort that raises falls back to one client at a time (each client's error reported as the
sequential engine reports it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedamole.fl.client import client_result, finish_client, load_state, optimizer_weight_decay
from fedamole.fl.cohort_eval import cohort_stats, evaluate_cohort
from fedamole.fl.cohort_sizing import CohortSizer
from fedamole.fl.cohort_stack import ClientStack
from fedamole.fl.engine import Engine, client_seed, update_client
from fedamole.fl.protocol import ClientResult, ClientTask
from fedamole.optim import StackedAdam, clip_grad_norm_per_client
from fedamole.segments import SegmentPlan, use_segments

__all__ = ["CohortEngine", "run_cohort"]


def _finishes_alone(task: ClientTask) -> bool:
    """FDLoRA's fusion and DP noise work on the client alone in the model (per-example forwards, a search)."""
    return task.fusion is not None or (task.stats and task.dp_eta is not None)


def _train(workload, stack: ClientStack, payloads, datas, seeds) -> tuple[list[list[float]], dict[int, str]]:
    """The cohort's local steps; returns each client's per-step losses and the crashed clients' errors."""
    model, num = workload.model, len(payloads)
    steps = [int(p.steps or 0) if datas[s].train else 0 for s, p in enumerate(payloads)]
    params = stack.trainable()
    losses: list[list[float]] = [[] for _ in range(num)]
    crashed: dict[int, str] = {}
    if not params or max(steps, default=0) == 0:
        return losses, crashed
    first = payloads[0]
    opt = StackedAdam(
        params,
        num,
        lr=[float(p.lr) if steps[s] else 0.0 for s, p in enumerate(payloads)],
        eps=1e-6,
        weight_decay=optimizer_weight_decay(first.optimizer),
    )
    batch_size, clip = int(first.batch_size or 1), first.max_grad_norm
    # Same data order as the sequential client: its own numpy generator seeded with its client seed.
    iters = [
        workload.batches(d.train, batch_size, steps=n, rng=np.random.default_rng(seed)) if n else iter(())
        for d, n, seed in zip(datas, steps, seeds)
    ]
    torch.manual_seed(seeds[0])  # dropout draws for the whole batch (they cannot equal the sequential ones anyway)
    model.train()
    for step in range(max(steps)):
        active = [steps[s] > step and s not in crashed for s in range(num)]
        for s in range(num):
            if active[s] and payloads[s].fault == "crash" and step == steps[s] // 2:
                crashed[s] = f"SimulatedClientCrash: injected crash at local step {step} of {steps[s]}"
                active[s] = False
        members = [s for s in range(num) if active[s]]
        if not members:
            break
        parts = [next(iters[s]) for s in members]
        rows = [0] * num
        for s, part in zip(members, parts):
            rows[s] = int(part["input_ids"].shape[0])
        batch, plan = workload.pack(workload.merge_batches(parts), SegmentPlan.from_counts(rows))
        with use_segments(model, stack.weights(), plan, extra=stack.extra_params()):
            per_client = workload.client_losses(batch, plan)  # 0 for a client without rows: no gradient
        opt.zero_grad()
        per_client.sum().backward()
        if clip:
            clip_grad_norm_per_client(opt.params, float(clip), num)
        opt.step(torch.tensor(active))
        values = per_client.detach().cpu().tolist()
        for s in members:
            losses[s].append(values[s])
    return losses, crashed


def run_cohort(
    workload, payloads: Sequence[ClientTask], datas: Sequence, seeds: Sequence[int], kind: str, choices=None
) -> list[ClientResult]:
    """One cohort's round: stack, train, evaluate, statistics, uploads; one result per client (as `client_update`).

    All payloads must share state keys, frozen kinds, batch size, max_grad_norm and optimiser."""
    model = workload.model
    states = [p.state for p in payloads]
    frozen = set(payloads[0].frozen)
    stack = ClientStack(model, states, frozen)
    losses, crashed = _train(workload, stack, payloads, datas, seeds)
    train_losses = [float(np.mean(v)) if v else float("nan") for v in losses]
    for s, p in enumerate(payloads):
        if p.fault == "diverge" and s not in crashed:
            stack.diverge(s, states[s], frozen)
            train_losses[s] = float("nan")
    alone = {s for s, p in enumerate(payloads) if _finishes_alone(p)}
    live = [s for s in range(len(payloads)) if s not in crashed]
    scored = [s for s in live if payloads[s].evaluate and s not in alone]
    metrics = dict(zip(scored, evaluate_cohort(workload, stack, [datas[s].test for s in scored], kind, choices)))
    with_stats = [s for s in live if payloads[s].stats and s not in alone]
    stats = dict(zip(with_stats, cohort_stats(workload, stack, [datas[s].embed or datas[s].train for s in with_stats])))
    out = []
    for s, payload in enumerate(payloads):
        if s in crashed:
            out.append(ClientResult.failed(crashed[s]))
        elif s in alone:
            load_state(model, stack.state(s, list(states[s]), states[s]))
            torch.manual_seed(seeds[s])
            out.append(finish_client(workload, payload, datas[s], states[s], seeds[s], train_losses[s], kind, choices))
        else:
            result = client_result(
                payload, datas[s], stack.client(s), states[s], metrics.get(s), stats.get(s), train_losses[s]
            )
            out.append(result)
    return out


def _shape(task: ClientTask) -> tuple:
    """Clients whose tasks have the same shape can share a cohort."""
    return (
        tuple(sorted(task.state)),
        tuple(sorted(task.frozen)),
        int(task.batch_size or 1),
        task.max_grad_norm or None,
        task.optimizer,
    )


class CohortEngine(Engine):
    """Runs a round's clients in cohorts, one forward (and backward) per step (see the module docstring).

    Options: ``cohort_size`` (at most this many clients per cohort; 0 = as many as the sizer allows),
    ``max_memory`` (bytes the process may use, default half the machine's RAM: activations of one training step
    grow with the cohort, see `CohortSizer`), ``cohort_tokens`` (the padded tokens per step beyond which a larger
    cohort buys no speed, only memory).
    """

    name = "cohort"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.options.get("cohort_size") or 0
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cohort_size must be an int >= 0 (0 = all clients), got {size!r}")
        self.cohort_size = size
        self.sizer = CohortSizer(self.options.get("max_memory"), self.options.get("cohort_tokens"))
        self._workload = None
        self.report = self._new_report()

    @staticmethod
    def _new_report() -> dict:
        """Per run: how many clients ran in cohorts, the cohort sizes, and why a cohort fell back to the sequential
        path."""
        return {"cohorts": 0, "cohort_clients": 0, "fallbacks": [], "sizes": []}

    @property
    def workload(self):
        if self._workload is None:
            self._workload = self.workload_factory()
        return self._workload

    def cohorts(
        self, payloads: Sequence[ClientTask], clients: Sequence[int] | None = None, data: Sequence | None = None
    ) -> tuple[list[list[int]], list[int]]:
        """(cohorts of positions in ``payloads`` run together, positions that take the sequential path); payload i is
        client ``clients[i]``'s (default: client i), whose data is ``data[i]`` when given."""
        data = self._datas(payloads, clients) if data is None else data
        groups: dict[tuple, list[int]] = {}
        alone = []
        for i, p in enumerate(payloads):
            if p.fault == "dropout" or not (data[i].train or data[i].test):
                alone.append(i)
            else:
                groups.setdefault(_shape(p), []).append(i)
        cohorts = []
        for members in groups.values():
            size = self.sizer.size(self.workload, [data[i] for i in members], payloads[members[0]])
            size = min(size, self.cohort_size or size)
            self.report["sizes"].append(size)
            # As many cohorts as the size needs, balanced (32 clients at size 10: 8 + 8 + 8 + 8, not 10 + 10 + 10 + 2).
            count = -(-len(members) // size)
            bounds = [len(members) * i // count for i in range(count + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                chunk = members[lo:hi]
                if len(chunk) > 1:
                    cohorts.append(chunk)
                else:
                    alone.extend(chunk)
        return cohorts, sorted(alone)

    def _datas(self, payloads: Sequence[ClientTask], clients: Sequence[int] | None) -> list:
        clients = range(len(payloads)) if clients is None else clients
        if len(clients) != len(payloads):
            raise ValueError(f"clients must name one client per payload ({len(payloads)}), got {len(clients)}")
        return [self.scenario.clients[c] for c in clients]

    def run(self, payloads: Sequence[ClientTask], round_idx: int) -> list[ClientResult]:
        return self.run_clients(payloads, range(len(payloads)), round_idx)

    def run_clients(self, payloads: Sequence[ClientTask], clients: Sequence[int], round_idx: int) -> list[ClientResult]:
        """Clients ``clients[i]`` with payloads ``payloads[i]`` (a Ray actor's share of a round: any client ids)."""
        sc, wl = self.scenario, self.workload
        data = self._datas(payloads, clients)
        seeds = [client_seed(self.seed, round_idx, c) for c in clients]
        self.report = self._new_report()
        cohorts, _ = self.cohorts(payloads, clients, data)
        done: dict[int, dict] = {}
        for members in tqdm(cohorts, desc=f"round {round_idx} cohorts", leave=False, disable=not self.progress):
            try:
                results = run_cohort(
                    wl,
                    [payloads[i] for i in members],
                    [data[i] for i in members],
                    [seeds[i] for i in members],
                    sc.kind,
                    sc.choices,
                )
            except Exception as exc:  # noqa: BLE001 - the sequential path reproduces or reports each client
                self.report["fallbacks"].append(
                    {"clients": [clients[i] for i in members], "error": f"{type(exc).__name__}: {exc}"}
                )
                continue
            done.update(zip(members, results))
            self.report["cohorts"] += 1
            self.report["cohort_clients"] += len(members)
        out = []
        for i, payload in enumerate(payloads):
            if i in done:
                out.append(done.pop(i))
            else:
                out.append(update_client(self, payload, clients[i], round_idx))
        # The global RNG where the sequential engine leaves it after its last client (dropout 0: nothing drawn).
        ran = [i for i, p in enumerate(payloads) if p.fault != "dropout"]
        if ran:
            torch.manual_seed(seeds[ran[-1]])
        return out
