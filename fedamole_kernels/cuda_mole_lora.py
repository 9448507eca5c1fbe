"""Backend "cuda": the CUDA kernels of `fedamole_kernels._C` (csrc/cuda/mole_lora_kernels.cu, bound by
csrc/cuda_ops.cpp), registered for the CUDA dispatch key of `torch.ops.fedamole_ext.*` (called through
`fedamole_kernels._ext_ops`).

Forward: one segmented GEMM for the shrink H = x [W_t | A_1..A_E | A_s]^T (fp32 out), one fused routing kernel
(scores, masked softmax, top-k, renormalisation, gated activations, per-segment usage counts), one segmented GEMM for
the expand. Backward: the shrink again, g [B..]^T, a fused routing-backward kernel, and three segmented GEMMs for the
input and weight gradients. bf16/fp16 GEMMs use tensor cores (WMMA) with fp32 accumulation; no host syncs.
float64 is not supported on this backend (use "cpu" or "reference").
"""

from __future__ import annotations

import torch

from fedamole_kernels._ext import HAS_CUDA_EXT
from fedamole_kernels._ext_ops import FUSED_OP, ExtBackend
from fedamole_kernels.problem import MoLEProblem

NAME = "cuda"
MAX_SLOTS = 64  # csrc/cuda/mole_lora_kernels.cuh: kMaxSlots
MAX_TOP_K = 16


def is_available(device: torch.device) -> bool:
    """True when the extension was built with its CUDA kernels and `device` is a CUDA device."""
    return HAS_CUDA_EXT and torch.device(device).type == "cuda"


class CudaBackend(ExtBackend):
    name = NAME

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return is_available(device)

    def check(self, problem: MoLEProblem) -> None:
        """This build and this backend's limits (float64, slots, top_k)."""
        self.require_ext(HAS_CUDA_EXT, "fedamole_kernels._C built with CUDA")
        if problem.x.dtype == torch.float64:
            raise TypeError("backend 'cuda' supports float32/float16/bfloat16 x, got float64 (use backend 'cpu')")
        if problem.num_slots > MAX_SLOTS:  # lora_a [S, E, r, d_in], or [E, r, d_in] for one segment
            raise ValueError(
                f"backend 'cuda' supports at most {MAX_SLOTS} expert slots, lora_a has {problem.num_slots}"
            )
        if problem.top_k > MAX_TOP_K:
            raise ValueError(f"backend 'cuda' supports top_k <= {MAX_TOP_K}, got {problem.top_k}")

    def _fused(self, *flat_args):
        """`fedamole_ext::mole_lora` (one dispatcher call, C++ autograd node; see `CpuBackend.fused`) behind this
        backend's limits."""
        self.check(MoLEProblem(*flat_args))
        return FUSED_OP(*flat_args)

    @property
    def fused(self):
        return None if FUSED_OP is None else self._fused
