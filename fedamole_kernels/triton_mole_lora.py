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
dtypes and devices are checked on the host (`MoLEProblem.check_launch`, no device access), tensors made contiguous, and
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
from fedamole_kernels._validation import check_offset_values, validate_backward_args
from fedamole_kernels.backends import Backend
from fedamole_kernels.problem import MoLEProblem

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


def _checked(problem: MoLEProblem) -> MoLEProblem:
    """Shapes, dtypes, devices (`check_launch`), then the problem with contiguous tensors; with no tokens no kernel
    runs to flag bad offsets, so on the host they are checked directly (CPU tensors only: free there, a sync on a
    GPU, where nothing is read anyway)."""
    problem.check_launch()
    if problem.num_tokens == 0 and problem.seg_offsets.device.type == "cpu":
        check_offset_values(problem.seg_offsets.tolist(), 0)
    return problem.contiguous()


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


def mole_lora_forward(problem: MoLEProblem) -> tuple[Tensor, Tensor, Tensor]:
    """Forward -> (delta [T, d_out] x.dtype, probs [T, E] float32, topk_idx [T, top_k] int64)."""
    p = problem = _checked(problem)
    if p.x.dtype == torch.float64:
        return reference.mole_lora_forward(problem)
    k = _kernels()
    x, num_tokens, num_slots, rank = p.x, p.num_tokens, p.num_slots, p.rank
    has_shared = p.shared_a is not None
    delta = x.new_empty(num_tokens, p.d_out)
    probs = x.new_empty(num_tokens, num_slots, dtype=torch.float32)
    topk_idx = torch.empty(num_tokens, p.top_k, dtype=torch.int64, device=x.device)
    if num_tokens == 0:
        return delta, probs, topk_idx
    ku = num_slots * rank + rank * has_shared
    # Rank-space buffers feed tl.dot against x / weights: keep them in x's dtype (fp32 accumulation inside).
    uv = x.new_empty(num_tokens, ku)
    ep = _pow2(num_slots, 2)
    err = torch.zeros(2, dtype=torch.int32, device=x.device)
    k.route_shrink_fwd[_token_grid(num_tokens, p.num_segments)](
        x,
        x if p.expert_input is None else p.expert_input,
        p.seg_offsets,
        p.lora_a,
        p.router,
        x if p.shared_a is None else p.shared_a,
        p.expert_mask,
        probs,
        topk_idx,
        uv,
        err,
        p.num_segments,
        num_tokens,
        num_slots,
        rank,
        p.d_in,
        ku,
        float(p.scaling),
        1.0 / math.sqrt(rank),
        SP=_pow2(p.num_segments, 2),
        EP=ep,
        R=_pow2(rank, 16),
        ZP=max(16, ep),
        TOPK=p.top_k,
        GE=k.route_group(ep, _pow2(rank, 16)),
        EMBED=p.router_type == "embedding",
        HAS_XE=p.expert_input is not None,
        HAS_SHARED=has_shared,
        **_launch_opts(x),
        **_meta("route"),
    )
    shared = _rows(p.shared_b, True) if has_shared else None
    expand(uv, p.seg_offsets, delta, p.expert_mask, _slots(p.lora_b, True), shared)
    _raise_flagged(err, "forward")
    return delta, probs, topk_idx


def mole_lora_backward(
    problem: MoLEProblem, grad_delta: Tensor, grad_probs: Tensor | None, probs: Tensor, topk_idx: Tensor
) -> tuple[Tensor | None, ...]:
    """Backward -> grads of (x, expert_input | None, lora_a, lora_b, router, shared_a | None, shared_b | None), each
    in its input's dtype. Uses the forward's probs / topk_idx (routing is not recomputed)."""
    p = problem = _checked(problem)
    validate_backward_args(problem, grad_delta, grad_probs, probs, topk_idx)
    if p.x.dtype == torch.float64:
        return reference.mole_lora_backward(problem, grad_delta, grad_probs, probs, topk_idx)
    probs, topk_idx = probs.contiguous(), topk_idx.contiguous()
    x = p.x
    ga, gb, gr = torch.empty_like(p.lora_a), torch.empty_like(p.lora_b), torch.empty_like(p.router)
    gsa = None if p.shared_a is None else torch.empty_like(p.shared_a)
    gsb = None if p.shared_b is None else torch.empty_like(p.shared_b)
    gx = torch.empty_like(x)
    gxe = None if p.expert_input is None else torch.empty_like(p.expert_input)
    if p.num_tokens == 0:
        for g in (ga, gb, gr, gsa, gsb):
            if g is not None:
                g.zero_()
        return gx, gxe, ga, gb, gr, gsa, gsb
    g = grad_delta.to(x.dtype).contiguous()
    gp = None if grad_probs is None else grad_probs.to(torch.float32).contiguous()
    ug, dx_buf, dxe_buf, err = _route_backward(p, g, gp, probs.to(torch.float32), topk_idx)
    has_shared, has_xe, embed = p.shared_a is not None, p.expert_input is not None, p.router_type == "embedding"
    # dB, dB_s = UG^T g per segment.
    _wgrad(ug, g, p.seg_offsets, _slots(gb, True), _rows(gsb, True) if has_shared else None, None)
    # dA, dA_s, dW_t (or dR) = Dx^T x (+ Dxe^T x_e) per segment; both buffers share the column layout.
    _wgrad(
        dx_buf,
        x,
        p.seg_offsets,
        _slots(ga, False),
        _rows(gsa, False) if has_shared else None,
        _rows(gr, False),
        d2=dxe_buf if has_xe else None,
        x2=p.expert_input,
    )
    # dx (and dx_e) = D @ [A | A_s | W_t] per segment.
    w_src = (_slots(p.lora_a, False), _rows(p.shared_a, False) if has_shared else None, _rows(p.router, False))
    expand(dx_buf, p.seg_offsets, gx, p.expert_mask, *w_src, mask_w3=not embed)
    if has_xe:
        expand(dxe_buf, p.seg_offsets, gxe, p.expert_mask, *w_src, mask_w3=not embed)
    _raise_flagged(err, "backward")
    return gx, gxe, ga, gb, gr, gsa, gsb


def _route_backward(p: MoLEProblem, g: Tensor, gp: Tensor | None, probs: Tensor, topk_idx: Tensor) -> tuple:
    """The `route_bwd` launch: recomputes the shrink, G = g @ B and the routing backward. Returns the rank-space
    buffers (UG [T, ku], Dx [T, kx], Dxe [T, kx] (Dx itself without expert_input)) and the error flags."""
    x, num_tokens, num_slots, rank = p.x, p.num_tokens, p.num_slots, p.rank
    has_shared, has_xe, embed = p.shared_a is not None, p.expert_input is not None, p.router_type == "embedding"
    ku = num_slots * rank + rank * has_shared
    kx = ku + (rank if embed else num_slots)
    ug = x.new_empty(num_tokens, ku)  # x's dtype, as in the forward
    dx_buf = x.new_empty(num_tokens, kx)
    dxe_buf = x.new_empty(num_tokens, kx) if has_xe else dx_buf
    err = torch.zeros(2, dtype=torch.int32, device=x.device)
    _kernels().route_bwd[_token_grid(num_tokens, p.num_segments)](
        g,
        probs if gp is None else gp,
        x,
        x if p.expert_input is None else p.expert_input,
        p.seg_offsets,
        p.lora_a,
        p.lora_b,
        p.router,
        x if p.shared_a is None else p.shared_a,
        x if p.shared_b is None else p.shared_b,
        probs,
        topk_idx,
        p.expert_mask,
        ug,
        dx_buf,
        dxe_buf,
        err,
        p.num_segments,
        num_tokens,
        num_slots,
        rank,
        p.d_in,
        p.d_out,
        ku,
        kx,
        float(p.scaling),
        1.0 / math.sqrt(rank),
        SP=_pow2(p.num_segments, 2),
        EP=_pow2(num_slots, 2),
        R=_pow2(rank, 16),
        TOPK=p.top_k,
        GE=_kernels().route_group(_pow2(num_slots, 2), _pow2(rank, 16)),
        EMBED=embed,
        HAS_XE=has_xe,
        HAS_SHARED=has_shared,
        HAS_GP=gp is not None,
        **_launch_opts(x),
        **_meta("route"),
    )
    return ug, dx_buf, dxe_buf, err


class TritonBackend(Backend):
    name = NAME

    @staticmethod
    def is_available(device: torch.device | str) -> bool:
        return is_available(device)

    forward = staticmethod(mole_lora_forward)
    backward = staticmethod(mole_lora_backward)
