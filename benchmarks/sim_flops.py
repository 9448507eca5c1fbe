"""Real-token FLOPs of one simulation round, from the model's shapes, and the machine's fp32 matmul peak.

FLOPs are counted for real tokens only (padding is waste, not work), matmul products only (2 per multiply-add;
softmax, norms and other element-wise work are left out), as the work an ideal implementation must do:

* the backbone's linear layers (nn.Linear, GPT-2's Conv1D): 2 d_in d_out per token (per sequence for a pooled head);
* attention (scaled_dot_product_attention): QK^T and PV, 2 L (d_qk + d_v) per token of a sequence of real length
  L (no discount for the causal mask);
* each MoLE adapter per token, with E_a the client's active experts and k = min(top_k, E_a): the router (embedding
  router: W_t x and the expert embeddings A_i x of every active slot, 2 (E_a + 1) r d_in; linear router: 2 E_a
  d_in), the k selected experts (2 k r d_out, plus 2 k r d_in for A_i x' when the experts see a dropout copy x',
  or with the linear router) and the shared expert (2 r (d_in + d_out));
* training = forward + backward with a frozen base: a frozen linear computes its input gradient only (where its
  input needs one: nothing below the first adapter does), a trained one (adapters, a classification head) its
  weight gradient as well; attention computes dP, dQ, dK, dV as its inputs need them.

Which layers run, their shapes and which of their inputs need a gradient come from one traced training step of
one real example on the real model (`trace_shapes`); the counts then follow from the shapes alone. A round's FLOPs
(`round_flops`) sum, per client: local_steps x batch_size training examples (the expected cost of an example drawn
from the client's training set: the sampled batches themselves are not reproduced), the per-round evaluation of
the test set (x the candidate answers for causal-LM classification) and the embedding statistics (one forward of
the embedding set, or of the training set when it has none, plus the statistics' own products).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# The simulation's public builders: the one place the simulation benchmark imports them (the package layout moves).
from fedamole import mole_modules
from fedamole.dropout import ATTENTION_NAME
from fedamole.simulation.presets import (
    build_data,
    build_workload,
    clients_per_expert,
    make_algorithm,
    make_config,
    mole_config,
)

__all__ = [
    "AdapterCall",
    "AttentionCall",
    "LinearCall",
    "ModelShapes",
    "RoundFlops",
    "build_run",
    "make_config",
    "matmul_peak",
    "mean_active_experts",
    "real_lengths",
    "round_flops",
    "trace_shapes",
]


@dataclass(frozen=True)
class LinearCall:
    """One call of a linear layer in a forward: ``per_token`` False for a pooled head (once per sequence)."""

    name: str
    d_in: int
    d_out: int
    per_token: bool
    input_grad: bool  # its input needs a gradient
    weight_grad: bool  # its weight is trained
    backward: bool  # a gradient reached its output

    def forward(self) -> float:
        return 2.0 * self.d_in * self.d_out

    def backward_flops(self) -> float:
        return 2.0 * self.d_in * self.d_out * (self.input_grad + self.weight_grad) if self.backward else 0.0


@dataclass(frozen=True)
class AdapterCall:
    """One MoLE adapter (every weight trained) on a linear layer."""

    name: str
    d_in: int
    d_out: int
    rank: int
    top_k: int
    router: str
    shared: bool
    dropout: bool
    input_grad: bool

    def products(self, active: float) -> tuple[float, float]:
        """Multiply-adds per token: (those whose input is x, those on the adapter's own intermediates)."""
        k, r = min(self.top_k, active), self.rank
        if self.router == "embedding":
            on_x = (active + 1) * r * self.d_in + (k * r * self.d_in if self.dropout else 0.0)
        else:
            on_x = active * self.d_in + k * r * self.d_in
        inner = k * r * self.d_out
        if self.shared:
            on_x, inner = on_x + r * self.d_in, inner + r * self.d_out
        return on_x, inner

    def forward(self, active: float) -> float:
        return 2.0 * sum(self.products(active))

    def backward_flops(self, active: float) -> float:
        on_x, inner = self.products(active)
        return 2.0 * (on_x + inner) + 2.0 * inner + (2.0 * on_x if self.input_grad else 0.0)

    def statistics(self, active: float) -> float:
        """The embedding statistics' own products per token (t = W_t x, e_i = A_i x; none for the linear router)."""
        return 2.0 * (active + 1) * self.rank * self.d_in if self.router == "embedding" else 0.0


@dataclass(frozen=True)
class AttentionCall:
    """One scaled_dot_product_attention call: widths over the query heads, and which of q, k, v need gradients."""

    d_qk: int
    d_v: int
    grads: tuple[bool, bool, bool]
    backward: bool

    def forward(self, length: int) -> float:
        return 2.0 * length * length * (self.d_qk + self.d_v)

    def backward_flops(self, length: int) -> float:
        if not self.backward:
            return 0.0
        q, k, v = self.grads
        width = self.d_v * ((q or k) + v) + self.d_qk * (q + k)  # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
        return 2.0 * length * length * width


@dataclass(frozen=True)
class ModelShapes:
    """What one training step of a model runs (`trace_shapes`), and its FLOPs per sequence of real length L."""

    linears: tuple[LinearCall, ...]
    adapters: tuple[AdapterCall, ...]
    attentions: tuple[AttentionCall, ...]

    def forward(self, length: int, active: float, stats: bool = False) -> float:
        """Forward FLOPs of one sequence (``stats``: plus the embedding statistics' products)."""
        token = sum(c.forward() for c in self.linears if c.per_token)
        token += sum(a.forward(active) + (a.statistics(active) if stats else 0.0) for a in self.adapters)
        sequence = sum(c.forward() for c in self.linears if not c.per_token)
        return length * token + sequence + sum(a.forward(length) for a in self.attentions)

    def training(self, length: int, active: float) -> float:
        """Forward + backward FLOPs of one training sequence."""
        token = sum(c.backward_flops() for c in self.linears if c.per_token)
        token += sum(a.backward_flops(active) for a in self.adapters)
        sequence = sum(c.backward_flops() for c in self.linears if not c.per_token)
        backward = length * token + sequence + sum(a.backward_flops(length) for a in self.attentions)
        return self.forward(length, active) + backward


class _AttentionRecorder(TorchFunctionMode):
    """Records every F.scaled_dot_product_attention call (shapes, which inputs need gradients, its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            heads = q.shape[-3] if q.dim() >= 3 else 1
            call = {"length": q.shape[-2], "d_qk": heads * q.shape[-1], "d_v": heads * v.shape[-1]}
            call.update(grads=(q.requires_grad, k.requires_grad, v.requires_grad), backward=False)
            self.calls.append(call)
            if out.requires_grad:
                out.register_hook(lambda g, call=call: call.update(backward=True))
        return out


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    conv1d = type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    return isinstance(module, nn.Linear) or conv1d


def _linear_hook(records: list, name: str, length: int):
    def hook(module, args, output):
        x, weight = args[0], module.weight
        d_in, d_out = (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else tuple(weight.shape)
        rows = x.numel() // d_in
        if rows not in (length, 1):
            raise ValueError(
                f"{name}: {rows} rows for a traced sequence of {length} tokens (neither per token nor one)"
            )
        rec = {"name": name, "d_in": int(d_in), "d_out": int(d_out), "per_token": rows == length}
        rec.update(input_grad=x.requires_grad, weight_grad=weight.requires_grad, backward=False)
        records.append(rec)
        if output.requires_grad:
            output.register_hook(lambda g: rec.update(backward=True))

    return hook


def _adapter_hook(records: list, name: str):
    def hook(module, args):
        c = module.config
        rec = {"name": name, "d_in": module.in_features, "d_out": module.out_features, "rank": c.rank}
        rec.update(top_k=c.top_k, router=c.router, shared=c.shared_expert, dropout=c.dropout > 0)
        records.append({**rec, "input_grad": args[0].requires_grad})

    return hook


def trace_shapes(workload, example) -> ModelShapes:
    """One training step (forward + backward) of ``example`` alone on ``workload.model``, recording every linear
    layer, MoLE adapter and attention call; the model's gradients are cleared afterwards."""
    model = workload.model
    batch = workload.collate([example])
    length = int(batch["attention_mask"].sum())
    if length < 2:
        raise ValueError(f"example: the trace needs a sequence of at least 2 tokens, got {length}")
    linears, adapters, handles = [], [], []
    for name, module in model.named_modules():
        if _is_linear(module):
            handles.append(module.register_forward_hook(_linear_hook(linears, name, length)))
    for name, module in mole_modules(model).items():
        handles.append(module.register_forward_pre_hook(_adapter_hook(adapters, name)))
    was_training = model.training
    model.train()
    # fedamole_sdpa (fedamole.dropout) runs the same products as sdpa outside F.scaled_dot_product_attention when it
    # trains with dropout: trace with plain sdpa so that the recorder sees every attention call.
    switched = [
        m
        for m in model.modules()
        if hasattr(m, "set_attn_implementation") and m.config._attn_implementation == ATTENTION_NAME
    ]
    for m in switched:
        m.set_attn_implementation("sdpa")
    try:
        with torch.enable_grad(), _AttentionRecorder() as attention:
            workload.loss(batch).backward()
    finally:
        for h in handles:
            h.remove()
        for m in switched:
            m.set_attn_implementation(ATTENTION_NAME)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if not attention.calls:
        raise ValueError("the model ran no scaled_dot_product_attention: this FLOP model counts sdpa attention only")
    if any(call.pop("length") != length for call in attention.calls):
        raise ValueError("an attention call's query length differs from the traced sequence's real length")
    return ModelShapes(
        tuple(LinearCall(**r) for r in linears),
        tuple(AdapterCall(**r) for r in adapters),
        tuple(AttentionCall(**c) for c in attention.calls),
    )


def real_lengths(workload, examples, batch_size: int = 256) -> np.ndarray:
    """Real token count (attention mask) of each example as the workload collates it for training."""
    out = [np.zeros(0, dtype=np.int64)]
    for i in range(0, len(examples), batch_size):
        mask = workload.collate(examples[i : i + batch_size])["attention_mask"]
        out.append(mask.sum(1).cpu().numpy())
    return np.concatenate(out)


def _eval_examples(scenario, examples) -> list:
    """The sequences the evaluation runs: each test example, or each (prompt, candidate) pair when a causal LM scores
    classification by candidate loss (counted with the EOS after the candidate, as the authors score them)."""
    if scenario.kind != "classification":
        raise ValueError(
            f"scenario kind {scenario.kind!r}: generation evaluation is not modelled (classification only)"
        )
    if not scenario.choices:
        return list(examples)
    return [dataclasses.replace(ex, target=choice) for ex in examples for choice in scenario.choices]


@dataclass(frozen=True)
class RoundFlops:
    """Real-token FLOPs and tokens of one training round (all clients), and of the initial evaluation."""

    training: float
    evaluation: float
    statistics: float
    training_tokens: float
    evaluation_tokens: int
    statistics_tokens: int
    active_experts: float

    @property
    def total(self) -> float:
        return self.training + self.evaluation + self.statistics


def mean_active_experts(cfg, algo) -> float:
    """Mean experts a client holds: each of the N_e pool experts goes to exactly k_c clients (SPEC §3)."""
    num_experts = getattr(algo, "num_experts", None)
    if num_experts is None:
        raise ValueError(f"algorithm {cfg.algorithm!r}: the FLOP model covers the FedAMoLE variants only")
    return min(float(cfg.fedamole.get("max_experts", 8)), num_experts * clients_per_expert(cfg) / cfg.clients)


def build_run(cfg):
    """(scenario, algorithm, workload) of a configuration, built as `fedamole simulate` builds them."""
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    return scenario, algo, workload


def round_flops(cfg) -> RoundFlops:
    """Real-token FLOPs of one training round of ``cfg`` (a FedAMoLE variant on a classification scenario)."""
    scenario, algo, workload = build_run(cfg)
    active = mean_active_experts(cfg, algo)
    first = next(c.train[0] for c in scenario.clients if c.train)
    shapes = trace_shapes(workload, first)
    totals = dict.fromkeys(("training", "evaluation", "statistics", "training_tokens"), 0.0)
    eval_tokens = stats_tokens = 0
    needs_stats = getattr(algo, "assignment", None) in ("rsea", "homogeneous")
    for client in scenario.clients:
        if client.train and cfg.local_steps > 0:
            lengths = real_lengths(workload, client.train)
            examples = cfg.local_steps * cfg.batch_size
            totals["training"] += examples * float(np.mean([shapes.training(int(n), active) for n in lengths]))
            totals["training_tokens"] += examples * float(lengths.mean())
        lengths = real_lengths(workload, _eval_examples(scenario, client.test))
        totals["evaluation"] += sum(shapes.forward(int(n), active) for n in lengths)
        eval_tokens += int(lengths.sum())
        if needs_stats:
            lengths = real_lengths(workload, client.embed or client.train)
            totals["statistics"] += sum(shapes.forward(int(n), active, stats=True) for n in lengths)
            stats_tokens += int(lengths.sum())
    return RoundFlops(
        totals["training"],
        totals["evaluation"],
        totals["statistics"],
        totals["training_tokens"],
        eval_tokens,
        stats_tokens,
        active,
    )


def matmul_peak(threads: int, size: int = 2048, reps: int = 7) -> float:
    """fp32 FLOP/s of ``torch.mm`` of two [size, size] matrices on ``threads`` threads: median of ``reps`` timed
    products after two warm-ups (the thread count is restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        out = torch.empty(size, size)
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return 2.0 * size**3 / statistics.median(times)
    finally:
        torch.set_num_threads(previous)
