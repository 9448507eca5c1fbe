"""Backend "cpu": the C++ kernels of `fedamole_kernels._C` (csrc/mole_lora_cpu_*.cpp), registered as
`torch.ops.fedamole_ext.*` (called through `fedamole_kernels._ext_ops`).

The C++ op fuses routing (scores, masked softmax, top-k, renormalisation, gating) and its backward into loops over
(segment, token block) work items run with `at::parallel_for`; the GEMMs go through ATen. Results do not depend on the
thread count.
"""

from __future__ import annotations

import torch

from fedamole_kernels._ext import HAS_CPU_EXT
from fedamole_kernels._ext_ops import FUSED_OP, ExtBackend

NAME = "cpu"


def is_available(device: torch.device) -> bool:
    """True when the extension is built and `device` is the CPU."""
    return HAS_CPU_EXT and torch.device(device).type == "cpu"


class CpuBackend(ExtBackend):
    name = NAME
    # Differentiable forward in one dispatcher call: `fedamole_ext::mole_lora`, whose C++ autograd node runs
    # `mole_lora_bwd` (no Python in the backward). Weights with their segment dimension, or without it for one segment
    # (lora_a [E, r, d_in], ..., expert_mask [E]; their gradients then have that shape). Eager only (no fake kernel).
    # Takes `MoLEProblem.flat_args()` with int64 offsets (the layer calls it directly).
    fused = FUSED_OP

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return is_available(device)

    def check(self, problem) -> None:
        self.require_ext(HAS_CPU_EXT, "the compiled extension fedamole_kernels._C")
