"""Triton backend of `mole_lora`: fused routing + segmented multi-LoRA expert matmuls, forward and backward.

Semantics are those of `fedamole_kernels.reference` (per segment s, x_e = expert_input or x)::

    z = (einsum("td,erd->ter", x, A[s]) * (x @ W_t[s].T)[:, None]).sum(-1) / sqrt(r)   # or x @ R[s].T
    p = masked_softmax(z, mask[s]); idx = topk(p, k); w = p[idx] / p[idx].sum(-1)
    delta = scaling * (sum_{i in idx} w_i * (x_e @ A[s, i].T) @ B[s, i].T + (x_e @ A_s[s].T) @ B_s[s].T)

Forward = two launches: `route_shrink_fwd` (one pass over x: shrink, scores, softmax, top-k, gates, writes the
gated rank activations UV [T, E*r + r]) and `seg_gemm` (the expand, delta = UV @ [B | B_s]^T per segment).
Backward = four launches: `route_bwd` (recompute the shrink, G = g @ B, fused routing backward), `seg_wgrad` twice
(dB, dB_s from g; dA, dA_s, dW_t from x / x_e) and `seg_gemm` once or twice (dx, dx_e). Accumulation is float32;
no atomics (every output element is written by one program), so results are deterministic. No host syncs.

float64 inputs fall back to the reference (Triton's fp64 tl.dot is not worth a kernel variant here).

The launchers defend themselves, whoever calls them (the custom ops pass their arguments through unchecked): shapes,
dtypes and devices are checked on the host (`validate_mole_args`, no device access), tensors made contiguous, and
the kernels clamp seg_offsets into [0, T] and only compare top-k ids, so no value indexes out of bounds. Invalid
offsets or ids set a device error flag instead of a host check: on CPU tensors (the interpreter) it is read at once
and raises ValueError; on a GPU `torch._assert_async` raises without a host sync (a device-side assert, after which
the CUDA context is unusable: the process must restart, but it never runs on with garbage). Masked slots are
absent: their A, B and linear-router rows are never loaded and their probs and gradients are selected to 0.
Kernels run on CUDA tensors, or on CPU tensors in the Triton interpreter when $TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch
from torch import Tensor

try:
    import triton
except Exception as exc:  # a broken install must read as "not installed" to the backend table
    raise ImportError(f"the Triton backend needs triton: {exc}") from exc

from fedamole_kernels import reference
from fedamole_kernels._validation import (
    MoLEShapes,
    check_launch_args,
    check_offset_values,
    validate_backward_args,
)

NAME = "triton"
_KERNELS = "fedamole_kernels.triton_mole_kernels"
_kernel_module: ModuleType | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels() -> ModuleType:
    """The kernel module, re-imported when $TRITON_INTERPRET changed since its kernels were decorated.

    triton.jit picks interpreter vs compiler when the decorator runs, so a module imported before a test set
    TRITON_INTERPRET=1 would otherwise keep GPU-only kernels.
    """
    global _kernel_module
    if _kernel_module is None:
        _kernel_module = importlib.import_module(_KERNELS)
    if _kernel_module.INTERPRETED != _interpreting():
        _kernel_module = importlib.reload(_kernel_module)
    return _kernel_module


def is_available(device: torch.device | str) -> bool:
    """CUDA tensors when a GPU is visible; CPU tensors only under the interpreter ($TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


def _pow2(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


def _launch_opts(x: Tensor) -> dict:
    """Dtype-dependent constexprs: bf16 upcast in the interpreter; fp32 dots in IEEE unless TF32 is allowed."""
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return {
        "UPCAST": _kernels().INTERPRETED and x.dtype == torch.bfloat16,
        "PREC": "tf32" if (x.dtype != torch.float32 or tf32) else "ieee",
    }


def _buf_dtype(x: Tensor) -> torch.dtype:
    # Rank-space buffers feed tl.dot against x / weights: keep them in x's dtype (fp32 accumulation inside).
    return x.dtype


def _meta(kind: str) -> dict:
    k = _kernels()
    return dict(k.INTERPRET_META[kind]) if k.INTERPRETED else {}


def _token_grid(num_tokens: int, num_segments: int, n: int | None = None, bn: str = "BN"):
    """Programs over (segment, token tile): cdiv(T, BM) + S bounds the number of per-segment tiles."""
    if n is None:
        return lambda meta: (triton.cdiv(num_tokens, meta["BM"]) + num_segments,)
    return lambda meta: (triton.cdiv(num_tokens, meta["BM"]) + num_segments, triton.cdiv(n, meta[bn]))


def expand(
    d: Tensor,
    seg_offsets: Tensor,
    out: Tensor,
    expert_mask: Tensor,
    w1: tuple,
    w2: tuple | None = None,
    w3: tuple | None = None,
    accumulate: bool = False,
    mask_w3: bool = False,
) -> Tensor:
    """out[seg s rows] (+)= d[rows] @ W_cat[s], grouped over segments.

    W_cat[s] stacks, along K, `w1` = (tensor, stride_seg, stride_slot, stride_row, stride_n, rows_per_slot, slots)
    then `w2`, `w3` = (tensor, stride_seg, stride_row, stride_n, rows). d: [T, K] with K = rows*slots (+ rows2 +
    rows3), out: [T, N]. With `accumulate`, adds into out (the addmm into a base linear's output). Slots of w1 (and
    with `mask_w3`, rows of w3) that expert_mask [S, slots] marks absent read as zeros.
    """
    k = _kernels()
    num_tokens, kd = d.shape
    n = out.shape[1]
    num_segments = seg_offsets.shape[0] - 1
    dummy = (d, 0, 0, 0, 0)
    k.seg_gemm[_token_grid(num_tokens, num_segments, n)](
        d,
        seg_offsets,
        out,
        expert_mask,
        *w1,
        *(w2 or dummy),
        *(w3 or dummy),
        num_segments,
        num_tokens,
        kd,
        n,
        SP=_pow2(num_segments, 2),
        HAS_W2=w2 is not None,
        HAS_W3=w3 is not None,
        ACC=accumulate,
        MASK_W3=mask_w3,
        **_launch_opts(d),
        **_meta("gemm"),
    )
    return out


def _wgrad(
    d: Tensor,
    x: Tensor,
    seg_offsets: Tensor,
    o1: tuple,
    o2: tuple | None,
    o3: tuple | None,
    d2: Tensor | None = None,
    x2: Tensor | None = None,
) -> None:
    """Per segment O_cat = d_seg^T @ x_seg (+ d2_seg^T @ x2_seg) scattered into o1 (slots), o2, o3 (row blocks)."""
    k = _kernels()
    kd, n = d.shape[1], x.shape[1]
    num_segments = seg_offsets.shape[0] - 1
    dummy = (d, 0, 0, 0, 0)
    grid = lambda meta: (num_segments, triton.cdiv(kd, meta["BKD"]), triton.cdiv(n, meta["BN"]))
    k.seg_wgrad[grid](
        d,
        x,
        d if d2 is None else d2,
        x if x2 is None else x2,
        seg_offsets,
        *o1,
        *(o2 or dummy),
        *(o3 or dummy),
        x.shape[0],
        kd,
        n,
        HAS_D2=d2 is not None,
        HAS_O2=o2 is not None,
        HAS_O3=o3 is not None,
        **_launch_opts(x),
        **_meta("wgrad"),
    )


def _slots(t: Tensor, row_is_inner: bool) -> tuple:
    """Operand tuple for a slot-stacked [S, E, a, b] tensor: rows = r (dim 2 for A, dim 3 for B)."""
    s_, e_, a_, b_ = t.shape
    if row_is_inner:  # B [S, E, d_out, r]: row j has stride 1, column n stride r
        return (t, e_ * a_ * b_, a_ * b_, 1, b_, b_, e_)
    return (t, e_ * a_ * b_, a_ * b_, b_, 1, a_, e_)  # A [S, E, r, d]: row stride d, column stride 1


def _rows(t: Tensor, row_is_inner: bool) -> tuple:
    """Operand tuple for a [S, a, b] tensor (shared_a / router [S, r|E, d]: rows = a; shared_b [S, d, r]: rows = b)."""
    s_, a_, b_ = t.shape
    if row_is_inner:
        return (t, a_ * b_, 1, b_, b_)
    return (t, a_ * b_, b_, 1, a_)


def _check_args(
    x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input, top_k, scaling, router_type
) -> None:
    """Shapes, dtypes, devices (`check_launch_args`); with no tokens no kernel runs to flag bad offsets, so on the
    host they are checked directly (CPU tensors only: free there, a sync on a GPU, where nothing is read anyway)."""
    check_launch_args(x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input, top_k,
                      scaling, router_type)  # fmt: skip
    if x.shape[0] == 0 and seg_offsets.device.type == "cpu":
        check_offset_values(seg_offsets.tolist(), 0)


def _contiguous(*tensors):
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def _raise_flagged(err: Tensor, what: str) -> None:
    """Raise for the kernels' error flags err [2] (0: seg_offsets, 1: topk_idx); see the module docstring."""
    messages = (
        "seg_offsets must start at 0, be non-decreasing and end at T = x.shape[0]",
        "topk_idx must hold -1 or active slots of each token's segment (expert_mask True), without repeats: pass the "
        "forward's topk_idx",
    )
    if err.device.type == "cpu":
        for flag, message in zip(err.tolist(), messages):
            if flag:
                raise ValueError(f"mole_lora (triton {what}): {message}")
        return
    torch._assert_async(err.eq(0).all(), f"mole_lora (triton {what}): invalid seg_offsets or topk_idx")


def mole_lora_forward(
    x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, top_k, scaling, router_type
):
    """Forward -> (delta [T, d_out] x.dtype, probs [T, E] float32, topk_idx [T, top_k] int64)."""
    _check_args(x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input, top_k,
                scaling, router_type)  # fmt: skip
    if x.dtype == torch.float64:
        return reference.mole_lora_forward(
            x,
            expert_input,
            seg_offsets,
            lora_a,
            lora_b,
            router,
            shared_a,
            shared_b,
            expert_mask,
            top_k,
            scaling,
            router_type,
        )
    x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask = _contiguous(
        x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask
    )
    k = _kernels()
    num_tokens, d_in = x.shape
    num_segments, num_slots, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    has_shared = shared_a is not None
    delta = x.new_empty(num_tokens, d_out)
    probs = x.new_empty(num_tokens, num_slots, dtype=torch.float32)
    topk_idx = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    if num_tokens == 0:
        return delta, probs, topk_idx
    ku = num_slots * rank + rank * has_shared
    uv = x.new_empty(num_tokens, ku, dtype=_buf_dtype(x))
    ep = _pow2(num_slots, 2)
    err = torch.zeros(2, dtype=torch.int32, device=x.device)
    k.route_shrink_fwd[_token_grid(num_tokens, num_segments)](
        x,
        x if expert_input is None else expert_input,
        seg_offsets,
        lora_a,
        router,
        x if shared_a is None else shared_a,
        expert_mask,
        probs,
        topk_idx,
        uv,
        err,
        num_segments,
        num_tokens,
        num_slots,
        rank,
        d_in,
        ku,
        float(scaling),
        1.0 / math.sqrt(rank),
        SP=_pow2(num_segments, 2),
        EP=ep,
        R=_pow2(rank, 16),
        ZP=max(16, ep),
        TOPK=top_k,
        EMBED=router_type == "embedding",
        HAS_XE=expert_input is not None,
        HAS_SHARED=has_shared,
        **_launch_opts(x),
        **_meta("route"),
    )
    expand(uv, seg_offsets, delta, expert_mask, _slots(lora_b, True), _rows(shared_b, True) if has_shared else None)
    _raise_flagged(err, "forward")
    return delta, probs, topk_idx


def mole_lora_backward(
    grad_delta,
    grad_probs,
    x,
    expert_input,
    seg_offsets,
    lora_a,
    lora_b,
    router,
    shared_a,
    shared_b,
    expert_mask,
    probs,
    topk_idx,
    top_k,
    scaling,
    router_type,
):
    """Backward -> grads of (x, expert_input | None, lora_a, lora_b, router, shared_a | None, shared_b | None), each
    in its input's dtype. Uses the forward's probs / topk_idx (routing is not recomputed)."""
    _check_args(x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input, top_k,
                scaling, router_type)  # fmt: skip
    shapes = MoLEShapes(x.shape[0], lora_a.shape[0], lora_a.shape[1], lora_a.shape[2], x.shape[1], lora_b.shape[2])
    validate_backward_args(shapes, x, grad_delta, grad_probs, probs, topk_idx, top_k)
    if x.dtype == torch.float64:
        return reference.mole_lora_backward(
            grad_delta,
            grad_probs,
            x,
            expert_input,
            seg_offsets,
            lora_a,
            lora_b,
            router,
            shared_a,
            shared_b,
            expert_mask,
            probs,
            topk_idx,
            top_k,
            scaling,
            router_type,
        )
    x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, probs, topk_idx = (
        _contiguous(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, probs,
                    topk_idx)
    )  # fmt: skip
    k = _kernels()
    num_tokens, d_in = x.shape
    num_segments, num_slots, rank, _ = lora_a.shape
    d_out = lora_b.shape[2]
    has_shared, has_xe, embed = shared_a is not None, expert_input is not None, router_type == "embedding"
    ga, gb, gr = torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(router)
    gsa = None if shared_a is None else torch.empty_like(shared_a)
    gsb = None if shared_b is None else torch.empty_like(shared_b)
    gx = torch.empty_like(x)
    gxe = None if expert_input is None else torch.empty_like(expert_input)
    if num_tokens == 0:
        for g in (ga, gb, gr, gsa, gsb):
            if g is not None:
                g.zero_()
        return gx, gxe, ga, gb, gr, gsa, gsb

    g = grad_delta.to(x.dtype).contiguous()
    gp = None if grad_probs is None else grad_probs.to(torch.float32).contiguous()
    probs = probs.to(torch.float32)
    ku = num_slots * rank + rank * has_shared
    kx = ku + (rank if embed else num_slots)
    bd = _buf_dtype(x)
    ug = x.new_empty(num_tokens, ku, dtype=bd)
    dx_buf = x.new_empty(num_tokens, kx, dtype=bd)
    dxe_buf = x.new_empty(num_tokens, kx, dtype=bd) if has_xe else dx_buf
    xe = x if expert_input is None else expert_input
    err = torch.zeros(2, dtype=torch.int32, device=x.device)
    k.route_bwd[_token_grid(num_tokens, num_segments)](
        g,
        probs if gp is None else gp,
        x,
        xe,
        seg_offsets,
        lora_a,
        lora_b,
        router,
        x if shared_a is None else shared_a,
        x if shared_b is None else shared_b,
        probs,
        topk_idx,
        expert_mask,
        ug,
        dx_buf,
        dxe_buf,
        err,
        num_segments,
        num_tokens,
        num_slots,
        rank,
        d_in,
        d_out,
        ku,
        kx,
        float(scaling),
        1.0 / math.sqrt(rank),
        SP=_pow2(num_segments, 2),
        EP=_pow2(num_slots, 2),
        R=_pow2(rank, 16),
        TOPK=top_k,
        EMBED=embed,
        HAS_XE=has_xe,
        HAS_SHARED=has_shared,
        HAS_GP=gp is not None,
        **_launch_opts(x),
        **_meta("route"),
    )
    # dB, dB_s = UG^T g per segment.
    _wgrad(ug, g, seg_offsets, _slots(gb, True), _rows(gsb, True) if has_shared else None, None)
    # dA, dA_s, dW_t (or dR) = Dx^T x (+ Dxe^T x_e) per segment; both buffers share the column layout.
    _wgrad(
        dx_buf,
        x,
        seg_offsets,
        _slots(ga, False),
        _rows(gsa, False) if has_shared else None,
        _rows(gr, False),
        d2=dxe_buf if has_xe else None,
        x2=expert_input,
    )
    # dx (and dx_e) = D @ [A | A_s | W_t] per segment.
    w_src = (_slots(lora_a, False), _rows(shared_a, False) if has_shared else None, _rows(router, False))
    expand(dx_buf, seg_offsets, gx, expert_mask, *w_src, mask_w3=not embed)
    if has_xe:
        expand(dxe_buf, seg_offsets, gxe, expert_mask, *w_src, mask_w3=not embed)
    _raise_flagged(err, "backward")
    return gx, gxe, ga, gb, gr, gsa, gsb
