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

from fedamole_kernels import cpu_mole_lora as _ext_wrappers
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
    if lora_a.shape[-3] > MAX_SLOTS:  # [S, E, r, d_in], or [E, r, d_in] for one segment
        raise ValueError(f"backend 'cuda' supports at most {MAX_SLOTS} expert slots, lora_a has {lora_a.shape[-3]}")
    if top_k > MAX_TOP_K:
        raise ValueError(f"backend 'cuda' supports top_k <= {MAX_TOP_K}, got {top_k}")


# Explicit wrappers rather than a generic one: binding the arguments with inspect.signature cost ~5 us per call.
def mole_lora_forward(
    x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, top_k, scaling, router_type
):
    """`cpu_mole_lora.mole_lora_forward` (the ops dispatch on the device) behind this backend's limits."""
    _require_ext(x, lora_a, top_k)
    return _ext_wrappers.mole_lora_forward(
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
    """`cpu_mole_lora.mole_lora_backward` behind this backend's limits."""
    _require_ext(x, lora_a, top_k)
    return _ext_wrappers.mole_lora_backward(
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


if hasattr(_ext_wrappers, "mole_lora_autograd"):

    def mole_lora_autograd(
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
    ):
        """`cpu_mole_lora.mole_lora_autograd` (one dispatcher call, C++ autograd node) behind this backend's limits."""
        _require_ext(x, lora_a, top_k)
        return _ext_wrappers.mole_lora_autograd(
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


def mole_route(x, seg_offsets, lora_a, router, expert_mask, top_k=2, router_type="embedding"):
    """`cpu_mole_lora.mole_route` behind this backend's limits."""
    _require_ext(x, lora_a, top_k)
    return _ext_wrappers.mole_route(x, seg_offsets, lora_a, router, expert_mask, top_k, router_type)
