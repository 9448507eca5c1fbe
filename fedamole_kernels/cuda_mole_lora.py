"""Backend "cuda": the CUDA kernels of `fedamole_kernels._C` (csrc/cuda/mole_lora_kernels.cu, bound by
csrc/cuda_ops.cpp), registered for the CUDA dispatch key of `torch.ops.fedamole_ext.*`.

Forward: one segmented GEMM for the shrink H = x [W_t | A_1..A_E | A_s]^T (fp32 out), one fused routing kernel
(scores, masked softmax, top-k, renormalisation, gated activations, per-segment usage counts), one segmented GEMM for
the expand. Backward: the shrink again, g [B..]^T, a fused routing-backward kernel, and three segmented GEMMs for the
input and weight gradients. bf16/fp16 GEMMs use tensor cores (WMMA) with fp32 accumulation; no host syncs.
float64 is not supported on this backend (use "cpu" or "reference").
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedamole_kernels._ext import HAS_CUDA_EXT

NAME = "cuda"
MAX_SLOTS = 64  # csrc/cuda/mole_lora_kernels.cuh: kMaxSlots
MAX_TOP_K = 16


def is_available(device: torch.device) -> bool:
    """True when the extension was built with its CUDA kernels and `device` is a CUDA device."""
    return HAS_CUDA_EXT and torch.device(device).type == "cuda"


def _require_ext(x: Tensor, lora_a: Tensor, top_k: int) -> None:
    if not HAS_CUDA_EXT:
        from fedamole_kernels._ext import EXT_IMPORT_ERROR

        raise RuntimeError(
            "backend 'cuda' needs fedamole_kernels._C built with CUDA "
            f"({EXT_IMPORT_ERROR or 'the extension was built without CUDA'})"
        )
    if x.dtype == torch.float64:
        raise TypeError("backend 'cuda' supports float32/float16/bfloat16 x, got float64 (use backend 'cpu')")
    if lora_a.shape[1] > MAX_SLOTS:
        raise ValueError(f"backend 'cuda' supports at most {MAX_SLOTS} expert slots, lora_a has {lora_a.shape[1]}")
    if top_k > MAX_TOP_K:
        raise ValueError(f"backend 'cuda' supports top_k <= {MAX_TOP_K}, got {top_k}")


def mole_lora_forward(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward on validated inputs: (delta [T, d_out] x.dtype, probs [T, E] f32, topk_idx [T, top_k] int64)."""
    _require_ext(x, lora_a, top_k)
    delta, probs, topk_idx = torch.ops.fedamole_ext.mole_lora_fwd(
        x, expert_input, seg_offsets.to(torch.int64), lora_a, lora_b, router, shared_a, shared_b, expert_mask,
        int(top_k), float(scaling), router_type,
    )
    return delta, probs, topk_idx


def mole_lora_backward(
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
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backward: grads of (x, expert_input, lora_a, lora_b, router, shared_a, shared_b), None for absent inputs."""
    _require_ext(x, lora_a, top_k)
    g_x, g_xe, g_a, g_b, g_r, g_sa, g_sb = torch.ops.fedamole_ext.mole_lora_bwd(
        grad_delta, grad_probs, x, expert_input, seg_offsets.to(torch.int64), lora_a, lora_b, router, shared_a,
        shared_b, expert_mask, probs, topk_idx, int(top_k), float(scaling), router_type,
    )
    return (
        g_x,
        None if expert_input is None else g_xe,
        g_a,
        g_b,
        g_r,
        None if shared_a is None else g_sa,
        None if shared_b is None else g_sb,
    )


def mole_route(
    x: Tensor, seg_offsets: Tensor, lora_a: Tensor, router: Tensor, expert_mask: Tensor, top_k: int = 2,
    router_type: str = "embedding",
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused routing kernel alone (no gradient): (probs [T, E] f32, topk_idx [T, top_k], counts [S, E] int64)."""
    _require_ext(x, lora_a, top_k)
    return tuple(
        torch.ops.fedamole_ext.mole_route(
            x.contiguous(), seg_offsets.to(torch.int64).contiguous(), lora_a.contiguous(), router.contiguous(),
            expert_mask.contiguous(), int(top_k), router_type,
        )
    )
