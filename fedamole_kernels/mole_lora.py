"""`mole_lora`: top-k routed mixture of LoRA experts over segments (clients), forward and backward.

Three layers, as in the rest of the package:
  1. `torch.library.custom_op`s `fedamole::mole_lora_fwd` / `fedamole::mole_lora_bwd` (+ `register_fake`, so
     `torch.compile` traces through them without graph breaks), dispatching to a backend module;
  2. `MoLELoRAFunction`, the autograd.Function tying them together;
  3. `mole_lora`, the validated functional API.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fedamole_kernels._validation import validate_mole_args
from fedamole_kernels.backends import get_backend, resolve_backend, resolve_backend_for_trace

_EMPTY_SHAPE = (0,)


def _no_autocast(device_type: str):
    """The kernels choose their own precisions (fp32 accumulation, fp32 probs): the GEMMs they call must not be
    recast by an enclosing `torch.autocast` (on the cpu backend that turned fp32 buffers into bf16 and crashed)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _probs_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fedamole::mole_lora_fwd", mutates_args=())
def _mole_lora_fwd(
    x: Tensor,
    expert_input: Tensor | None,
    seg_offsets: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor,
    shared_a: Tensor | None,
    shared_b: Tensor | None,
    expert_mask: Tensor,
    top_k: int,
    scaling: float,
    router_type: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(x.device.type):
        return get_backend(backend).mole_lora_forward(
            x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
            top_k, scaling, router_type,
        )


@_mole_lora_fwd.register_fake
def _(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, top_k, scaling,
      router_type, backend):
    num_tokens, num_slots, d_out = x.shape[0], lora_a.shape[1], lora_b.shape[2]
    delta = x.new_empty(num_tokens, d_out)
    probs = x.new_empty(num_tokens, num_slots, dtype=_probs_dtype(x))
    topk_idx = x.new_empty(num_tokens, top_k, dtype=torch.int64)
    return delta, probs, topk_idx


@torch.library.custom_op("fedamole::mole_lora_bwd", mutates_args=())
def _mole_lora_bwd(
    grad_delta: Tensor,
    grad_probs: Tensor | None,
    x: Tensor,
    expert_input: Tensor | None,
    seg_offsets: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor,
    shared_a: Tensor | None,
    shared_b: Tensor | None,
    expert_mask: Tensor,
    probs: Tensor,
    topk_idx: Tensor,
    top_k: int,
    scaling: float,
    router_type: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _no_autocast(x.device.type):
        grads = get_backend(backend).mole_lora_backward(
            grad_delta, grad_probs, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b,
            expert_mask, probs, topk_idx, top_k, scaling, router_type,
        )
    # Custom ops cannot return None: absent inputs get an empty placeholder that the Function maps back to None.
    return tuple(x.new_empty(_EMPTY_SHAPE) if g is None else g for g in grads)


@_mole_lora_bwd.register_fake
def _(grad_delta, grad_probs, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
      probs, topk_idx, top_k, scaling, router_type, backend):
    def like(t):
        return x.new_empty(_EMPTY_SHAPE) if t is None else torch.empty_like(t)

    return like(x), like(expert_input), like(lora_a), like(lora_b), like(router), like(shared_a), like(shared_b)


class MoLELoRAFunction(torch.autograd.Function):
    """Autograd glue: forward and backward are the custom ops above; `topk_idx` is not differentiable."""

    @staticmethod
    def forward(ctx, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                top_k, scaling, router_type, backend):
        delta, probs, topk_idx = torch.ops.fedamole.mole_lora_fwd(
            x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
            top_k, scaling, router_type, backend,
        )
        ctx.save_for_backward(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                              probs, topk_idx)
        ctx.config = (top_k, scaling, router_type, backend)
        ctx.mark_non_differentiable(topk_idx)
        ctx.set_materialize_grads(False)
        return delta, probs, topk_idx

    @staticmethod
    def backward(ctx, grad_delta, grad_probs, _grad_idx):
        x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, probs, topk_idx = (
            ctx.saved_tensors
        )
        top_k, scaling, router_type, backend = ctx.config
        if grad_delta is None:
            grad_delta = torch.zeros(x.shape[0], lora_b.shape[2], dtype=x.dtype, device=x.device)
        grads = torch.ops.fedamole.mole_lora_bwd(
            grad_delta.contiguous(), None if grad_probs is None else grad_probs.contiguous(), x, expert_input,
            seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, probs, topk_idx,
            top_k, scaling, router_type, backend,
        )
        g_x, g_xe, g_a, g_b, g_r, g_sa, g_sb = grads
        return (
            g_x,
            None if expert_input is None else g_xe,
            None,
            g_a,
            g_b,
            g_r,
            None if shared_a is None else g_sa,
            None if shared_b is None else g_sb,
            None, None, None, None, None,
        )


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
        seg_offsets = torch.tensor([0, x.shape[0]], dtype=torch.int64, device=x.device)
    validate_mole_args(
        x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input,
        top_k, scaling, router_type, check_values=not trusted,
    )
    name = (resolve_backend_for_trace if torch.compiler.is_compiling() else resolve_backend)(backend, x.device)
    if expert_mask is None:
        expert_mask = torch.ones(lora_a.shape[:2], dtype=torch.bool, device=x.device)

    def contiguous(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    return MoLELoRAFunction.apply(
        x.contiguous(), contiguous(expert_input), seg_offsets.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
        router.contiguous(), contiguous(shared_a), contiguous(shared_b), expert_mask.contiguous(),
        int(top_k), float(scaling), router_type, name,
    )


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
    """`mole_lora` without the per-call argument validation, for callers that checked their tensors once.

    Same semantics and shapes as `mole_lora`; `expert_mask` is required, every tensor must already have the shape,
    dtype and device `mole_lora` would accept, and `seg_offsets` must hold valid values (it is never read on the
    host). `backend` is a resolved backend name (None only under torch.compile, resolved at trace time).
    `MoLEExperts` validates its own weights when they change and uses this on every forward.
    """
    if seg_offsets is None:
        seg_offsets = torch.tensor([0, x.shape[0]], dtype=torch.int64, device=x.device)
    if backend is None or torch.compiler.is_compiling():
        backend = resolve_backend_for_trace(backend, x.device)

    def contiguous(t: Tensor | None) -> Tensor | None:
        return t if t is None or t.is_contiguous() else t.contiguous()

    return MoLELoRAFunction.apply(
        contiguous(x), contiguous(expert_input), seg_offsets, contiguous(lora_a), contiguous(lora_b),
        contiguous(router), contiguous(shared_a), contiguous(shared_b), contiguous(expert_mask),
        int(top_k), float(scaling), router_type, backend,
    )
