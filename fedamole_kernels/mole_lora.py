"""`mole_lora`: top-k routed mixture of LoRA experts over segments (clients), forward and backward.

Layers, as in the rest of the package:
  0. `MoLEProblem` (fedamole_kernels.problem): the op's tensors and static config, built and validated once by
     `mole_lora`; every layer below passes it (or its `to_op_args()`) and none lists the tensors;
  1. `torch.library.custom_op`s `fedamole::mole_lora_fwd` / `fedamole::mole_lora_bwd` (+ `register_fake`, so
     `torch.compile` traces through them without graph breaks), taking the problem's tensors as one `Tensor?[]` in
     field order plus its config, and dispatching to a backend;
  2. `_MoLELoRAFunction`, the private autograd.Function tying them together (under torch.compile, and in eager mode
     for the reference and triton backends, where it calls the backend directly: the custom op cost ~28 us per eager
     call);
  3. the cpu and cuda backends' fused op `fedamole_ext::mole_lora` (C++ autograd node: one dispatcher call per
     forward, no Python in the backward), which eager calls use instead of 1-2;
  4. `mole_lora`, the validated functional API, and `mole_lora_prevalidated` for callers that checked their tensors
     once (`MoLEExperts` calls the fused op itself when it can).

Work per call of the layer path (`MoLEExperts`, one segment, E=8, r=8, top-2, shared expert, no dropout; the base
linear and the `base(x) + delta` add not counted). reference / cpu: counted with torch.profiler on CPU at d=16
(T=1 | T=64); "from Python" = dispatcher calls entered from Python, "ATen ops" = all of them including views,
"GEMMs" = mm/addmm/bmm calls (fwd+bwd includes the `y.backward(ones_like(y))` call's own ops); triton / cuda:
kernel launches counted from the code (no GPU in this session):

    backend    fwd: from Python / ATen ops / GEMMs      fwd+bwd: from Python / ATen ops / GEMMs   host syncs
    reference  70 / 227 / 8  (T=64 the same)            205 / 677 / 29  (T=64: 205 / 716 / 32)      1 fwd + 1 bwd
    cpu         1 / 106 / 6  (T=64:  1 / 68 / 2)          9 / 344 / 21  (T=64:   9 / 232 / 7)       0

    backend    kernel launches fwd        kernel launches bwd                                  host syncs
    triton     2 (route_shrink, expand)   4: route_bwd, 2 seg_wgrad, 1 seg_gemm (+1 with       0 (autotune syncs once
                                          dropout); +1 zero-fill if only probs get a gradient   per problem-size key)
    cuda       6: 3 weight stacking       15: 3 stacking, shrink, g B GEMM, routing backward,  0
               copies, shrink GEMM,       dx GEMM, dW GEMM, dB GEMM, 6 copies of the weight
               routing, expand (+1 with   grads out of the stacked buffers (+3 with dropout)
               dropout)

Not in these counts, the self-defence of each backend (every registered op checks what it dereferences): triton
and cuda add an error-flag fill, its reduction and an `_assert_async` per direction (4 tiny launches), cuda also the
masking of absent slots in its stacked weights (logical_not + 2-3 masked fills); the triton launchers re-check shapes
in Python (~5 us); the cpu op scans seg_offsets and, in the backward, topk_idx (S+1 and T*k integers). The reference
checks its arguments too and reads topk_idx's validity in the same host read as the offsets.

The reference's syncs are the `seg_offsets.tolist()` of its Python loop over segments (its `mask.any()` branch, one
sync per segment, is gone); the fused backends never read seg_offsets or any other device value on the host, the
layer caches its offsets per (T, S, device) and `mole_lora(seg_offsets=None)` its [0, T] per (T, device), so no
tensor is built from Python per call. Not counted: under autocast the layer's casts of x and the five weights to the
autocast dtype (one kernel each when the dtypes differ), and in training the dropout on the experts' input.

Autocast: the layer casts x and the weights to the autocast dtype itself (`MoLEExperts.forward`), and the kernels
turn autocast off around their own fp32 GEMMs. The op is not registered with `torch.library.register_autocast`:
that API casts every floating input to one dtype fixed at registration, while the layer follows the dtype of the
enclosing `torch.autocast` (bf16 or fp16), and the eager cpu/cuda path does not go through the custom op at all.
`probs` stays float32 either way (the kernels compute it in fp32 from any input dtype).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fedamole_kernels._ext_ops import ext_args
from fedamole_kernels.backends import get_backend, resolve_backend, resolve_backend_for_trace
from fedamole_kernels.problem import GRAD_FIELDS, SEGMENT_FIELDS, TENSOR_FIELDS, MoLEProblem, compute_dtype

_EMPTY_SHAPE = (0,)
_NUM_TENSORS = len(TENSOR_FIELDS)
_SQUEEZED = tuple(n for n in GRAD_FIELDS if n in SEGMENT_FIELDS)  # gradients of one-segment weights lose dim 0


def _no_autocast(device_type: str):
    """The kernels choose their own precisions (fp32 accumulation, fp32 probs): the GEMMs they call must not be
    recast by an enclosing `torch.autocast` (on the cpu backend that turned fp32 buffers into bf16 and crashed)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("fedamole::mole_lora_fwd", mutates_args=())
def _mole_lora_fwd(
    tensors: list[Tensor | None], top_k: int, scaling: float, router_type: str, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    problem = MoLEProblem.from_op_args(tensors, top_k, scaling, router_type)
    with _no_autocast(problem.x.device.type):
        return get_backend(backend).forward(problem)


@_mole_lora_fwd.register_fake
def _(tensors, top_k, scaling, router_type, backend):
    p = MoLEProblem.from_op_args(tensors, top_k, scaling, router_type)
    delta = p.x.new_empty(p.num_tokens, p.d_out)
    probs = p.x.new_empty(p.num_tokens, p.num_slots, dtype=compute_dtype(p.x))
    topk_idx = p.x.new_empty(p.num_tokens, p.top_k, dtype=torch.int64)
    return delta, probs, topk_idx


@torch.library.custom_op("fedamole::mole_lora_bwd", mutates_args=())
def _mole_lora_bwd(
    grad_delta: Tensor,
    grad_probs: Tensor | None,
    tensors: list[Tensor | None],
    probs: Tensor,
    topk_idx: Tensor,
    top_k: int,
    scaling: float,
    router_type: str,
    backend: str,
) -> list[Tensor]:
    problem = MoLEProblem.from_op_args(tensors, top_k, scaling, router_type)
    with _no_autocast(problem.x.device.type):
        grads = get_backend(backend).backward(problem, grad_delta, grad_probs, probs, topk_idx)
    # Custom ops cannot return None: absent inputs get an empty placeholder that the Function maps back to None.
    return [problem.x.new_empty(_EMPTY_SHAPE) if g is None else g for g in grads]


@_mole_lora_bwd.register_fake
def _(grad_delta, grad_probs, tensors, probs, topk_idx, top_k, scaling, router_type, backend):
    problem = MoLEProblem.from_op_args(tensors, top_k, scaling, router_type)
    likes = (getattr(problem, name) for name in GRAD_FIELDS)
    return [problem.x.new_empty(_EMPTY_SHAPE) if t is None else torch.empty_like(t) for t in likes]


def _run_forward(problem: MoLEProblem, backend: str) -> tuple:
    """Forward on a (stacked) problem: the custom op under torch.compile (one opaque node in the graph), else the
    backend directly. The custom op costs ~28 us per eager call by itself (dispatcher, its Python kernel, the
    dynamo-disable wrapper: 47 us through the op vs 19 us for the bare backend at d=16, T=1, 1 thread). Autocast is
    turned off around the backend as in the custom ops (`_no_autocast`), without a context manager when it is off
    already."""
    if torch.compiler.is_compiling():
        return torch.ops.fedamole.mole_lora_fwd(*problem.to_op_args(), backend)
    return _without_autocast(problem, get_backend(backend).forward)


def _run_backward(problem: MoLEProblem, backend: str, grad_delta, grad_probs, probs, topk_idx) -> tuple:
    """Backward counterpart of `_run_forward`: one gradient per GRAD_FIELDS entry, None for absent (None) inputs."""
    if torch.compiler.is_compiling():
        tensors, *config = problem.to_op_args()
        grads = torch.ops.fedamole.mole_lora_bwd(grad_delta, grad_probs, tensors, probs, topk_idx, *config, backend)
        return tuple(None if getattr(problem, n) is None else g for n, g in zip(GRAD_FIELDS, grads))
    return _without_autocast(problem, get_backend(backend).backward, grad_delta, grad_probs, probs, topk_idx)


def _without_autocast(problem: MoLEProblem, call, *args):
    """`call(problem, *args)` with autocast off (see `_no_autocast`), without a context manager when it is off."""
    device_type = problem.x.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return call(problem, *args)
    return call(problem, *args)


_OFFSETS: dict[tuple, Tensor] = {}


def _one_segment(x: Tensor) -> Tensor:
    """seg_offsets [0, T] for x, cached per (T, device) in eager mode: building it per call is a host->device copy per
    call on a GPU."""
    if torch.compiler.is_compiling():
        return torch.tensor([0, x.shape[0]], dtype=torch.int64, device=x.device)
    key = (x.shape[0], x.device)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if len(_OFFSETS) >= 64:
            _OFFSETS.clear()
        offsets = _OFFSETS[key] = torch.tensor([0, x.shape[0]], dtype=torch.int64, device=x.device)
    return offsets


class _MoLELoRAFunction(torch.autograd.Function):
    """Autograd glue: forward and backward of the backend (through the custom ops above under torch.compile);
    `topk_idx` is not differentiable. Arguments: the problem's tensors and config (`flat_args()`), then the backend.

    The weights may also come without their segment dimension (lora_a [E, r, d_in], ..., expert_mask [E]: one
    segment, the `MoLEExperts` layout); the segment dimension is then added here, outside autograd, rather than by
    five tracked views in the caller, each of which would add a view node to every backward.
    """

    @staticmethod
    def forward(ctx, *args):
        *flat, backend = args
        problem = MoLEProblem(*flat)
        ctx.set_materialize_grads(False)
        ctx.config = (tuple(flat[_NUM_TENSORS:]), backend)
        delta, probs, topk_idx = _run_forward(problem.stacked(), backend)
        ctx.save_for_backward(*flat[:_NUM_TENSORS], probs, topk_idx)
        ctx.mark_non_differentiable(topk_idx)
        return delta, probs, topk_idx

    @staticmethod
    def backward(ctx, grad_delta, grad_probs, _grad_idx):
        *tensors, probs, topk_idx = ctx.saved_tensors
        config, backend = ctx.config
        problem = MoLEProblem(*tensors, *config)
        x = problem.x
        if grad_delta is None:
            grad_delta = torch.zeros(x.shape[0], problem.d_out, dtype=x.dtype, device=x.device)
        grads = _run_backward(
            problem.stacked(),
            backend,
            grad_delta.contiguous(),
            None if grad_probs is None else grad_probs.contiguous(),
            probs,
            topk_idx,
        )
        by_name = dict(zip(GRAD_FIELDS, grads))
        if problem.lora_a.dim() == 3:  # one-segment weights: gradients in their shape
            for name in _SQUEEZED:
                if by_name[name] is not None:
                    by_name[name] = by_name[name].squeeze(0)
        return (*(by_name.get(name) for name in TENSOR_FIELDS), *(None for _ in config), None)


def mole_lora(
    x: Tensor,
    seg_offsets: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor,
    shared_a: Tensor | None = None,
    shared_b: Tensor | None = None,
    expert_mask: Tensor | None = None,
    expert_input: Tensor | None = None,
    top_k: int = 2,
    scaling: float = 2.0,
    router_type: str = "embedding",
    backend: str | None = None,
    check_offsets: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routed mixture-of-LoRA delta for tokens of S segments, each with its own experts.

    Semantics (per segment s with tokens x = x[seg_offsets[s]:seg_offsets[s+1]], A = lora_a[s], ...)::

        h = einsum("td,erd->ter", x, A); t = x @ router[s].T           # embedding router
        z = (h * t[:, None]).sum(-1) / sqrt(r)                          # linear router: z = x @ router[s].T
        p = softmax(z masked to expert_mask[s])                         # probs, 0 on masked slots
        idx = topk(p, min(top_k, active slots)); w = p[idx] / p[idx].sum(-1)
        x_e = expert_input or x
        delta = scaling * (sum_{i in idx} w_i * (x_e @ A[i].T) @ B[i].T + (x_e @ shared_a[s].T) @ shared_b[s].T)

    Shapes: x [T, d_in]; seg_offsets int [S+1] (0 = first <= ... <= last = T; None means one segment, S = 1);
    lora_a [S, E, r, d_in]; lora_b [S, E, d_out, r]; router [S, r, d_in] ("embedding") or [S, E, d_in]
    ("linear"); shared_a [S, r, d_in], shared_b [S, d_out, r] or both None; expert_mask bool [S, E] or None
    (all slots); expert_input [T, d_in] or None. All float inputs share x's dtype (fp32/bf16/fp16/fp64) and device.

    Returns (delta [T, d_out] in x.dtype, probs [T, E] float32 (float64 for float64 x), topk_idx [T, top_k] int64
    with -1 where a segment has fewer than top_k active slots). Differentiable w.r.t. every float input; gradients
    reach the router through the renormalised top-k gates and, for the embedding router, through h inside z.
    `backend`: "reference", "triton", "cuda", "cpu" or None (the fastest available, or $FEDAMOLE_BACKEND).
    `check_offsets=False` skips the value checks of `seg_offsets` (start 0, non-decreasing, end T), which cost a
    device->host sync per call on a GPU: only for offsets built by trusted code (`MoLELinear` builds its own).
    With `seg_offsets=None` and under `torch.compile` they are skipped as well.
    """
    trusted = seg_offsets is None or not check_offsets or torch.compiler.is_compiling()
    if seg_offsets is None and isinstance(x, Tensor):
        seg_offsets = _one_segment(x)
    problem = MoLEProblem.build(
        x=x, expert_input=expert_input, seg_offsets=seg_offsets, lora_a=lora_a, lora_b=lora_b, router=router,
        shared_a=shared_a, shared_b=shared_b, expert_mask=expert_mask, top_k=top_k, scaling=scaling,
        router_type=router_type, check_values=not trusted,
    )  # fmt: skip
    name = (resolve_backend_for_trace if torch.compiler.is_compiling() else resolve_backend)(backend, x.device)
    return _apply(problem, name)


def mole_lora_prevalidated(
    x: Tensor,
    seg_offsets: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor,
    shared_a: Tensor | None,
    shared_b: Tensor | None,
    expert_mask: Tensor,
    expert_input: Tensor | None,
    top_k: int,
    scaling: float,
    router_type: str,
    backend: str | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`mole_lora` without the per-call argument validation, for callers that checked their tensors once (the
    documented internal entry of `MoLEExperts`).

    Same semantics and shapes as `mole_lora`; `expert_mask` is required, every tensor must already have the shape,
    dtype and device `mole_lora` would accept, and `seg_offsets` must hold valid values (it is never read on the
    host). The weights may also come without their segment dimension (lora_a [E, r, d_in], lora_b [E, d_out, r],
    router [r | E, d_in], shared_a [r, d_in], shared_b [d_out, r], expert_mask [E]: one segment). `backend` is a
    resolved backend name (None only under torch.compile, resolved at trace time). `MoLEExperts` validates its own
    weights when they change and uses this on every forward it does not send to the fused op itself.

    Eager calls on the cpu and cuda backends are one dispatcher call (see `_apply`).
    """
    if seg_offsets is None:
        seg_offsets = _one_segment(x)
    if backend is None or torch.compiler.is_compiling():
        backend = resolve_backend_for_trace(backend, x.device)
    problem = MoLEProblem(
        x=x, expert_input=expert_input, seg_offsets=seg_offsets, lora_a=lora_a, lora_b=lora_b, router=router,
        shared_a=shared_a, shared_b=shared_b, expert_mask=expert_mask, top_k=int(top_k), scaling=float(scaling),
        router_type=router_type,
    )  # fmt: skip
    return _apply(problem.contiguous(), backend)


def _apply(problem: MoLEProblem, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The differentiable op on a checked, contiguous problem (weights with or without the segment dimension).

    Eager: the backend's fused autograd op where it has one (cpu, cuda: one dispatcher call, C++ backward node), else
    with gradients off the bare backend forward, else `_MoLELoRAFunction`. Under torch.compile: `_MoLELoRAFunction`
    over the traceable custom ops. Per call at d=16, T=1, 1 thread, forward with grad: ~35 us less through the fused
    op than through the Function, and its backward ~40 us less (no Python)."""
    if not torch.compiler.is_compiling():
        fused = get_backend(backend).fused
        if fused is not None:
            return fused(*ext_args(problem))
        if not torch.is_grad_enabled():
            return _run_forward(problem.stacked(), backend)
    return _MoLELoRAFunction.apply(*problem.flat_args(), backend)
