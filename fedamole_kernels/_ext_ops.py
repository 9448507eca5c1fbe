"""The compiled ops `torch.ops.fedamole_ext.*` behind a `Backend`: shared by the "cpu" and "cuda" backends.

The ops dispatch on the tensors' device, and their schemas take the problem's fields in order
(`MoLEProblem.flat_args()`): nothing here lists them. Absent gradients come back from C++ as empty tensors and are
mapped to None here.
"""

from __future__ import annotations

import torch

from fedamole_kernels._ext import HAS_CPU_EXT
from fedamole_kernels.backends import Backend
from fedamole_kernels.problem import GRAD_FIELDS, MoLEProblem

# The fused autograd op (csrc/mole_lora_autograd.cpp); None with an extension built before it existed, and then the
# backends' `fused` is None too (callers fall back to the Python autograd.Function).
_FUSED = getattr(torch.ops.fedamole_ext, "mole_lora", None) if HAS_CPU_EXT else None
FUSED_OP = None if _FUSED is None else _FUSED.default


def ext_args(problem: MoLEProblem) -> tuple:
    """`problem.flat_args()` with int64 offsets (the ops' type)."""
    # Offsets arrive as int64 from every caller in the package; skipping the no-op .to() saves an op call per call.
    if problem.seg_offsets.dtype != torch.int64:
        problem = problem.replace(seg_offsets=problem.seg_offsets.to(torch.int64))
    return problem.flat_args()


class ExtBackend(Backend):
    """forward / backward / fused through the extension's ops; subclasses add their device's checks (`check`)."""

    def check(self, problem: MoLEProblem) -> None:
        """Raise if this build or backend cannot run `problem` (the ops check shapes and values themselves)."""

    def require_ext(self, built: bool, what: str) -> None:
        """RuntimeError naming this backend when the extension it needs (`what`) is not in this build."""
        if not built:
            from fedamole_kernels._ext import EXT_IMPORT_ERROR

            raise RuntimeError(
                f"backend {self.name!r} needs {what} ({EXT_IMPORT_ERROR or 'the extension was built without CUDA'})"
            )

    def forward(self, problem: MoLEProblem):
        """(delta [T, d_out] x.dtype, probs [T, E] f32/f64, topk_idx [T, top_k] int64)."""
        self.check(problem)
        return tuple(torch.ops.fedamole_ext.mole_lora_fwd(*ext_args(problem)))

    def backward(self, problem: MoLEProblem, grad_delta, grad_probs, probs, topk_idx):
        """Grads of GRAD_FIELDS, None for absent inputs."""
        self.check(problem)
        args = ext_args(problem)
        num_tensors = len(args) - len(problem.config())
        grads = torch.ops.fedamole_ext.mole_lora_bwd(
            grad_delta, grad_probs, *args[:num_tensors], probs, topk_idx, *args[num_tensors:]
        )
        return tuple(None if getattr(problem, n) is None else g for n, g in zip(GRAD_FIELDS, grads))
