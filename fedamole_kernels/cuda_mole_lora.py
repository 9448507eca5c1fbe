"""Backend "cuda": the CUDA kernels of `fedamole_kernels._C` (csrc/cuda/mole_lora_kernels.cu, bound by
csrc/cuda_ops.cpp), registered for the CUDA dispatch key of `torch.ops.fedamole_ext.*`.

Forward: one segmented GEMM for the shrink H = x [W_t | A_1..A_E | A_s]^T (fp32 out), one fused routing kernel
(scores, masked softmax, top-k, renormalisation, gated activations, per-segment usage counts), one segmented GEMM for
the expand. Backward: the shrink again, g [B..]^T, a fused routing-backward kernel, and three segmented GEMMs for the
input and weight gradients. bf16/fp16 GEMMs use tensor cores (WMMA) with fp32 accumulation; no host syncs.
float64 is not supported on this backend (use "cpu" or "reference").
"""

from __future__ import annotations

import functools
import inspect

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
    if lora_a.shape[1] > MAX_SLOTS:
        raise ValueError(f"backend 'cuda' supports at most {MAX_SLOTS} expert slots, lora_a has {lora_a.shape[1]}")
    if top_k > MAX_TOP_K:
        raise ValueError(f"backend 'cuda' supports top_k <= {MAX_TOP_K}, got {top_k}")


def _checked(wrapper):
    """The device-agnostic extension wrapper `wrapper` of the cpu backend, behind this backend's limits."""
    signature = inspect.signature(wrapper)

    @functools.wraps(wrapper)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _require_ext(bound.arguments["x"], bound.arguments["lora_a"], bound.arguments["top_k"])
        return wrapper(*args, **kwargs)

    return call


mole_lora_forward = _checked(_ext_wrappers.mole_lora_forward)
mole_lora_backward = _checked(_ext_wrappers.mole_lora_backward)
mole_route = _checked(_ext_wrappers.mole_route)
