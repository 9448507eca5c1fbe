"""`MoLEProblem`: the one description of a `mole_lora` call that every layer of the package passes around.

The op's tensors (in the order of the registered ops' schemas) and its static config are the dataclass fields;
the problem sizes are derived from the shapes. Adding an argument to the op means adding a field here (with its
check in `_validation`), its semantics in the reference and its use in each kernel: the custom ops, the autograd
glue and the backend table take the problem (or its `to_op_args()`) and never list the tensors themselves.

Weights may come with their segment dimension (lora_a [S, E, r, d_in], ...) or, for one segment, without it
(lora_a [E, r, d_in], ..., expert_mask [E]: the `MoLEExperts` layout); `stacked()` adds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from fedamole_kernels import _validation


@dataclass(slots=True)
class MoLEProblem:
    """The inputs of one `mole_lora` call. Shapes (see `fedamole_kernels.mole_lora.mole_lora`)::

        x [T, d_in]; expert_input [T, d_in] | None; seg_offsets int [S+1]; lora_a [S, E, r, d_in];
        lora_b [S, E, d_out, r]; router [S, r | E, d_in]; shared_a [S, r, d_in] | None; shared_b [S, d_out, r] | None;
        expert_mask bool [S, E] (None only before `build`); top_k int; scaling float; router_type str

    A plain constructor call checks nothing (the backends check what they dereference: `check_launch`,
    `validate`); `build` is the validated constructor of the public API.
    """

    x: Tensor
    expert_input: Tensor | None
    seg_offsets: Tensor
    lora_a: Tensor
    lora_b: Tensor
    router: Tensor
    shared_a: Tensor | None
    shared_b: Tensor | None
    expert_mask: Tensor | None
    top_k: int
    scaling: float
    router_type: str

    # ---- sizes (weights with or without the segment dimension) -------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def num_segments(self) -> int:
        return self.seg_offsets.shape[0] - 1

    @property
    def num_slots(self) -> int:
        return self.lora_a.shape[-3]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-2]

    @property
    def d_in(self) -> int:
        return self.x.shape[1]

    @property
    def d_out(self) -> int:
        return self.lora_b.shape[-2]

    # ---- conversions --------------------------------------------------------------------------------------------
    def tensors(self) -> tuple:
        """The tensor fields, in field order (the registered ops' order)."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)  # (operator.attrgetter: a dynamo graph break)

    def config(self) -> tuple:
        """The static config fields (top_k, scaling, router_type, ...), in field order."""
        return tuple(getattr(self, name) for name in CONFIG_FIELDS)

    def flat_args(self) -> tuple:
        """Tensors then config: the argument list of the `fedamole_ext::*` ops."""
        return tuple(getattr(self, name) for name in ALL_FIELDS)

    def to_op_args(self) -> tuple:
        """(tensors as a list, *config): the leading arguments of the `fedamole::mole_lora_*` custom ops."""
        return (list(self.tensors()), *self.config())

    @classmethod
    def from_op_args(cls, tensors, *config) -> MoLEProblem:
        """Inverse of `to_op_args` (also of `flat_args` split into its tensors and config)."""
        return cls(*tensors, *config)

    def replace(self, **changes) -> MoLEProblem:
        return dataclasses.replace(self, **changes)

    def contiguous(self) -> MoLEProblem:
        """The problem with every tensor contiguous (the same object when they all are)."""
        changes = {
            n: t.contiguous() for n in TENSOR_FIELDS if (t := getattr(self, n)) is not None and not t.is_contiguous()
        }
        return self.replace(**changes) if changes else self

    def stacked(self) -> MoLEProblem:
        """One-segment weights (lora_a [E, r, d_in], ..., expert_mask [E]) -> [1, E, r, d_in], ... (views)."""
        if self.lora_a.dim() == 4:
            return self
        return self.replace(**{n: t.unsqueeze(0) for n in SEGMENT_FIELDS if (t := getattr(self, n)) is not None})

    # ---- checks -------------------------------------------------------------------------------------------------
    def validate(self, check_values: bool = True) -> None:
        """Every check of the public API (named ValueError/TypeError); `check_values` reads seg_offsets on the host."""
        _validation.validate_problem(self, check_values)

    def check_launch(self) -> None:
        """The checks a kernel launcher needs (shapes, dtypes, devices), with a fast path for valid problems."""
        _validation.check_launch(self)

    @classmethod
    def build(cls, *fields, check_values: bool = True, **named) -> MoLEProblem:
        """Validated constructor: checks every field, then fills expert_mask (all slots) and makes tensors
        contiguous. Same arguments as the constructor."""
        problem = cls(*fields, **named)
        problem.validate(check_values)
        if problem.expert_mask is None:
            problem.expert_mask = torch.ones(problem.lora_a.shape[:2], dtype=torch.bool, device=problem.x.device)
        problem.top_k, problem.scaling = int(problem.top_k), float(problem.scaling)
        return problem.contiguous()


TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(MoLEProblem) if "Tensor" in str(f.type))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MoLEProblem) if f.name not in TENSOR_FIELDS)
# Tensors with a leading segment dimension (absent for one-segment weights), and the differentiable ones: the
# backward of every backend returns one gradient per GRAD_FIELDS entry, None where the input is None.
ALL_FIELDS = TENSOR_FIELDS + CONFIG_FIELDS
SEGMENT_FIELDS = ("lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask")
GRAD_FIELDS = ("x", "expert_input", "lora_a", "lora_b", "router", "shared_a", "shared_b")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The precision the kernels compute in (and the dtype of probs): float64 for float64 x, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
