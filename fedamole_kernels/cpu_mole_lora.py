"""Backend "cpu": the C++ kernels of `fedamole_kernels._C` (csrc/mole_lora_cpu.cpp), registered as
`torch.ops.fedamole_ext.*`. The wrappers here are device-agnostic (the ops dispatch on the tensors' device), so
the "cuda" backend reuses them with its own checks.

The C++ op fuses routing (scores, masked softmax, top-k, renormalisation, gating) and its backward into loops over
(segment, token block) work items run with `at::parallel_for`; the GEMMs go through ATen. Results do not depend on the
thread count. Absent gradients come back from C++ as empty tensors and are mapped to None here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedamole_kernels._ext import HAS_CPU_EXT

NAME = "cpu"
# The fused autograd op (csrc/mole_lora_autograd.cpp); None with an extension built before it existed, and then
# `mole_lora_autograd` is not defined either (callers fall back to the Python autograd.Function).
_FUSED = getattr(torch.ops.fedamole_ext, "mole_lora", None) if HAS_CPU_EXT else None
_FUSED_OP = None if _FUSED is None else _FUSED.default


def is_available(device: torch.device) -> bool:
    """True when the extension is built and `device` is the CPU."""
    return HAS_CPU_EXT and torch.device(device).type == "cpu"


def _require_ext() -> None:
    if not HAS_CPU_EXT:
        from fedamole_kernels._ext import EXT_IMPORT_ERROR

        raise RuntimeError(f"backend 'cpu' needs the compiled extension fedamole_kernels._C ({EXT_IMPORT_ERROR})")


def _int64(offsets: Tensor) -> Tensor:
    # Offsets arrive as int64 from every caller in the package; skipping the no-op .to() saves an op call per call.
    return offsets if offsets.dtype == torch.int64 else offsets.to(torch.int64)


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
    """Forward on validated inputs: (delta [T, d_out] x.dtype, probs [T, E] f32/f64, topk_idx [T, top_k] int64)."""
    if not HAS_CPU_EXT:
        _require_ext()
    delta, probs, topk_idx = torch.ops.fedamole_ext.mole_lora_fwd(
        x,
        expert_input,
        _int64(seg_offsets),
        lora_a,
        lora_b,
        router,
        shared_a,
        shared_b,
        expert_mask,
        int(top_k),
        float(scaling),
        router_type,
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
    if not HAS_CPU_EXT:
        _require_ext()
    g_x, g_xe, g_a, g_b, g_r, g_sa, g_sb = torch.ops.fedamole_ext.mole_lora_bwd(
        grad_delta,
        grad_probs,
        x,
        expert_input,
        _int64(seg_offsets),
        lora_a,
        lora_b,
        router,
        shared_a,
        shared_b,
        expert_mask,
        probs,
        topk_idx,
        int(top_k),
        float(scaling),
        router_type,
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


def mole_lora_autograd(
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
    """Differentiable forward in one dispatcher call: `fedamole_ext::mole_lora`, whose C++ autograd node runs
    `mole_lora_bwd` (no Python in the backward). Weights with their segment dimension, or without it for one segment
    (lora_a [E, r, d_in], ..., expert_mask [E]; their gradients then have that shape). Eager only (no fake kernel)."""
    return _FUSED_OP(
        x, expert_input, _int64(seg_offsets), lora_a, lora_b, router, shared_a, shared_b, expert_mask,
        int(top_k), float(scaling), router_type,
    )  # fmt: skip


def mole_route(
    x: Tensor,
    seg_offsets: Tensor,
    lora_a: Tensor,
    router: Tensor,
    expert_mask: Tensor,
    top_k: int = 2,
    router_type: str = "embedding",
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing only (no gradient): (probs [T, E], topk_idx [T, top_k], counts [S, E] int64 of top-k slots per slot).

    `counts[s, i] / (tokens of s * top_k)` is the f_i of the load-balance loss.
    """
    _require_ext()
    return tuple(
        torch.ops.fedamole_ext.mole_route(
            x.contiguous(),
            seg_offsets.to(torch.int64).contiguous(),
            lora_a.contiguous(),
            router.contiguous(),
            expert_mask.contiguous(),
            int(top_k),
            router_type,
        )
    )


if _FUSED_OP is None:
    del mole_lora_autograd
