"""The one table of implementations every benchmark times (bench_mole.py, bench_cpu.py, bench_layer_overhead.py).

An `Implementation` has a `name`, an `available(device)` test and `build(shapes, dtype, device, with_base)`, which
returns a `Built`: `forward()` (the layer output y = x W0^T + adapter(x), or the adapter's delta alone with
`with_base=False`), the tensors that get gradients, and `forward_backward(grad)`. Every build draws the same seeded
tensors (`make_tensors`), so the implementations compute the same function on the same numbers.

| name | what it is |
|---|---|
| `base` | the frozen base linear alone, `x @ W0.T` (gradient: x only) |
| `peft` | PEFT's `lora.Linear` (r, alpha = 2r, no dropout) on the base: LoRA without routing, the floor |
| `reference`, `triton`, `cuda`, `cpu` | ours: `mole_lora(..., backend=name)`, where `available_backends` lists it |
| `mole`, `mole-ref` | ours as a layer: `MoLELinear` with backend "cpu" / "reference" (one segment) |
| `dense` | dense PyTorch MoLE, one call per segment: all expert projections in one einsum, masked softmax, top-k |
| `compile` | `torch.compile` of the dense formulation batched over equal-size segments |
| `authors_loop` | as the authors' layer: per client, dense routing, then a Python loop over experts on their tokens |

Adding an implementation (e.g. a new backend) is one entry in IMPLEMENTATIONS.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from bench_common import load_average  # noqa: F401 - re-exported: the benchmarks import it from here
from torch import nn

from fedamole_kernels import available_backends, mole_lora


@dataclass(frozen=True)
class Shapes:
    tokens: int
    d_in: int
    d_out: int
    slots: int
    active: int
    rank: int
    segments: int
    top_k: int = 2
    shared: bool = True
    scaling: float = 2.0


def make_tensors(shapes: Shapes, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """x [T, d_in] (grad), frozen W0 [d_out, d_in], adapter weights (grad; B random, not LoRA's zeros, so that every
    path does real work), the first `active` slots of each segment active, near-equal segments."""
    g = torch.Generator().manual_seed(seed)
    s = shapes
    S, E, r = s.segments, s.slots, s.rank

    def rnd(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device).requires_grad_(grad)

    mask = torch.zeros(S, E, dtype=torch.bool)
    mask[:, : s.active] = True
    bounds = [round(i * s.tokens / S) for i in range(S + 1)]
    return dict(
        x=rnd(s.tokens, s.d_in),
        w0=rnd(s.d_out, s.d_in, scale=s.d_in**-0.5, grad=False),
        lora_a=rnd(S, E, r, s.d_in, scale=s.d_in**-0.5),
        lora_b=rnd(S, E, s.d_out, r, scale=r**-0.5),
        router=rnd(S, r, s.d_in, scale=s.d_in**-0.5),
        shared_a=rnd(S, r, s.d_in, scale=s.d_in**-0.5) if s.shared else None,
        shared_b=rnd(S, s.d_out, r, scale=r**-0.5) if s.shared else None,
        expert_mask=mask.to(device),
        seg_offsets=torch.tensor(bounds, dtype=torch.int64, device=device),
    )


@dataclass
class Built:
    forward: Callable[[], torch.Tensor]
    grad_inputs: list[torch.Tensor]
    tensors: dict = field(default_factory=dict)
    module: nn.Module | None = None

    def forward_backward(self, grad: torch.Tensor):
        return torch.autograd.grad(self.forward(), self.grad_inputs, grad)


def _adapter_grads(t: dict) -> list[torch.Tensor]:
    return [v for v in t.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def _layer(t: dict, delta_fn: Callable[[], torch.Tensor], with_base: bool) -> Callable[[], torch.Tensor]:
    if not with_base:
        return delta_fn
    return lambda: t["x"] @ t["w0"].T + delta_fn()


# ------------------------------------------------------------------------------------------------- formulations
def dense_delta(x, lora_a, lora_b, router, shared_a, shared_b, mask, top_k: int, scaling: float):
    """Dense formulation batched over equal-size segments: x [S, n, d] -> delta [S, n, d_out].

    The strongest plain-PyTorch form we know: every down-projection (experts, router, shared) in one batched GEMM,
    every up-projection in another; all experts computed for every token, gates 0 outside the top-k. (An einsum form
    of the same math was 2.6x slower at T = 2048, d = 1024, 1 thread: a baseline must not be a straw man.)"""
    num_segments, num_slots, rank, d_in = lora_a.shape
    er = num_slots * rank
    parts = [lora_a.reshape(num_segments, er, d_in), router] + ([shared_a] if shared_a is not None else [])
    hidden = torch.bmm(x, torch.cat(parts, 1).transpose(1, 2))  # [S, n, E*r + r (+ r)]
    h = hidden[..., :er].unflatten(-1, (num_slots, rank))
    t = hidden[..., er : er + rank]
    z = (h * t[:, :, None]).sum(-1) / math.sqrt(rank)
    p = torch.softmax(z.float().masked_fill(~mask[:, None], float("-inf")), -1)
    vals, idx = p.topk(min(top_k, num_slots), -1)
    gates = torch.zeros_like(p).scatter(-1, idx, vals / vals.sum(-1, keepdim=True)).to(h.dtype)
    gated = [(h * gates[..., None]).flatten(-2)] + ([hidden[..., er + rank :]] if shared_a is not None else [])
    ups = [lora_b.permute(0, 2, 1, 3).reshape(num_segments, lora_b.shape[2], er)]
    ups += [shared_b] if shared_b is not None else []
    return scaling * torch.bmm(torch.cat(gated, -1), torch.cat(ups, -1).transpose(1, 2))


def _weights(t: dict, s: int | slice) -> tuple:
    names = ("lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask")
    return tuple(None if t[n] is None else t[n][s] for n in names)


def _build_backend(name: str) -> Callable:
    def build(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
        t = make_tensors(shapes, dtype, device)

        def delta():
            return mole_lora(
                t["x"],
                t["seg_offsets"],
                t["lora_a"],
                t["lora_b"],
                t["router"],
                t["shared_a"],
                t["shared_b"],
                t["expert_mask"],
                top_k=shapes.top_k,
                scaling=shapes.scaling,
                backend=name,
            )[0]

        return Built(_layer(t, delta, with_base), _adapter_grads(t), t)

    return build


def build_dense(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
    """One dense call per segment (client), as a pure-PyTorch user would write it."""
    t = make_tensors(shapes, dtype, device)
    bounds = t["seg_offsets"].tolist()

    def delta():
        outs = []
        for s in range(shapes.segments):
            xs = t["x"][bounds[s] : bounds[s + 1]][None]
            weights = [None if w is None else w[None] for w in _weights(t, s)]
            outs.append(dense_delta(xs, *weights, shapes.top_k, shapes.scaling)[0])
        return torch.cat(outs)

    return Built(_layer(t, delta, with_base), _adapter_grads(t), t)


def build_compiled(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
    if shapes.tokens % shapes.segments:
        raise ValueError("the dense torch.compile implementation needs equal-size segments")
    t = make_tensors(shapes, dtype, device)
    fn = torch.compile(dense_delta)

    def delta():
        xs = t["x"].view(shapes.segments, -1, shapes.d_in)
        out = fn(xs, *_weights(t, slice(None)), shapes.top_k, shapes.scaling)
        return out.reshape(shapes.tokens, -1)

    return Built(_layer(t, delta, with_base), _adapter_grads(t), t)


def build_authors_loop(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
    """As the authors' MoLE layer: one client at a time, dense routing (one expert embedding at a time), then a
    Python loop over experts on the tokens routed to each (index_select / index_add), with the host syncs that
    implies."""
    t = make_tensors(shapes, dtype, device)
    bounds = t["seg_offsets"].tolist()
    active = [t["expert_mask"][s].nonzero().flatten().tolist() for s in range(shapes.segments)]
    c = shapes.scaling

    def delta():
        x, outs = t["x"], []
        for s in range(shapes.segments):
            xs = x[bounds[s] : bounds[s + 1]]
            a, b = t["lora_a"][s], t["lora_b"][s]
            h = torch.stack([xs @ a[e].T for e in active[s]], 1)
            z = (h * (xs @ t["router"][s].T)[:, None]).sum(-1) / math.sqrt(shapes.rank)
            w, idx = torch.softmax(z.float(), -1).topk(min(shapes.top_k, len(active[s])), -1)
            w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
            shared = shapes.shared
            out = c * (xs @ t["shared_a"][s].T) @ t["shared_b"][s].T if shared else xs.new_zeros(len(xs), b.shape[1])
            for j, e in enumerate(active[s]):
                tok, slot = torch.where(idx == j)
                if tok.numel():
                    part = (xs[tok] @ a[e].T) @ b[e].T
                    out = out.index_add(0, tok, c * w[tok, slot, None] * part)
            outs.append(out)
        return torch.cat(outs)

    return Built(_layer(t, delta, with_base), _adapter_grads(t), t)


def base_linear(shapes: Shapes, dtype: torch.dtype, device: str) -> nn.Linear:
    """The frozen base nn.Linear (no bias: y = x W0^T), W0 from `make_tensors` (the same in every implementation)."""
    t = make_tensors(shapes, dtype, device)
    lin = nn.Linear(shapes.d_in, shapes.d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(t["w0"])
    return lin.requires_grad_(False)


def _module_built(module: nn.Module, t: dict, grad_inputs: list) -> Built:
    x = t["x"]
    return Built(lambda: module(x), grad_inputs, t, module)


def build_base(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
    t = make_tensors(shapes, dtype, device)
    return _module_built(base_linear(shapes, dtype, device), t, [t["x"]])


def build_peft(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
    from peft import LoraConfig, get_peft_model

    t = make_tensors(shapes, dtype, device)
    r = shapes.rank
    config = LoraConfig(r=r, lora_alpha=int(shapes.scaling * r), lora_dropout=0.0, target_modules=["lin"])
    model = get_peft_model(nn.Sequential(collections.OrderedDict(lin=base_linear(shapes, dtype, device))), config)
    layer = model.base_model.model.lin
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_(0, r**-0.5)
    return _module_built(layer.train(), t, [t["x"], *(p for p in layer.parameters() if p.requires_grad)])


def _build_mole_linear(backend: str) -> Callable:
    def build(shapes: Shapes, dtype: torch.dtype, device: str, with_base: bool = True) -> Built:
        from fedamole import MoLEConfig
        from fedamole.layers import MoLELinear

        t = make_tensors(shapes, dtype, device)
        r = shapes.rank
        config = MoLEConfig(
            num_experts=shapes.slots, rank=r, alpha=int(shapes.scaling * r), top_k=shapes.top_k, dropout=0.0,
            backend=backend,
        )  # fmt: skip
        layer = MoLELinear(base_linear(shapes, dtype, device), config)
        with torch.no_grad():
            layer.lora_b.normal_(0, r**-0.5)
            layer.shared_b.normal_(0, r**-0.5)
        return _module_built(layer.train(), t, [t["x"], *(p for p in layer.parameters() if p.requires_grad)])

    return build


def _peft_available(device: str) -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Implementation:
    name: str
    available: Callable[[str], bool]
    build: Callable[..., Built]


def _backend(name: str) -> Implementation:
    return Implementation(name, lambda device: name in available_backends(device), _build_backend(name))


_ALWAYS = lambda device: True  # noqa: E731
IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("base", _ALWAYS, build_base),
        Implementation("peft", _peft_available, build_peft),
        _backend("reference"),
        _backend("triton"),
        _backend("cuda"),
        _backend("cpu"),
        Implementation("mole", lambda device: "cpu" in available_backends("cpu"), _build_mole_linear("cpu")),
        Implementation("mole-ref", _ALWAYS, _build_mole_linear("reference")),
        Implementation("dense", _ALWAYS, build_dense),
        Implementation("compile", _ALWAYS, build_compiled),
        Implementation("authors_loop", _ALWAYS, build_authors_loop),
    )
}
