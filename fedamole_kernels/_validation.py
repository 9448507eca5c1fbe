"""Argument checks for `mole_lora`: every failure is a ValueError/TypeError that names the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUTER_TYPES = ("embedding", "linear")
# top_k above E only adds -1 padding to topk_idx [T, top_k]; past this it is surely a mistake (and memory).
MAX_PADDED_TOP_K = 64


@dataclass(frozen=True)
class MoLEShapes:
    num_tokens: int
    num_segments: int
    num_slots: int
    rank: int
    d_in: int
    d_out: int


def _require_tensor(name: str, value, ndim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _require_float(name: str, value: Tensor, dtype: torch.dtype | None = None) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but x has dtype {dtype}; all float inputs must match x")


def _require_shape(name: str, value: Tensor, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ({meaning}), got {list(value.shape)}")


def _require_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}; all tensors must be on one device")


def validate_mole_args(
    x, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask, expert_input,
    top_k, scaling, router_type, check_values: bool = True,
) -> MoLEShapes:
    """Check every argument of `mole_lora`; return the problem sizes.

    `check_values=False` skips the data-dependent checks of `seg_offsets` (they need a device->host copy), which
    `torch.compile` cannot trace without a graph break.
    """
    x = _require_tensor("x", x, 2)
    _require_float("x", x)
    num_tokens, d_in = x.shape
    if d_in < 1:
        raise ValueError(f"x must have d_in >= 1 features, got shape {tuple(x.shape)}")
    lora_a = _require_tensor("lora_a", lora_a, 4)
    _require_float("lora_a", lora_a, x.dtype)
    num_segments, num_slots, rank, a_din = lora_a.shape
    if a_din != d_in:
        raise ValueError(f"lora_a must have shape [S, E, r, d_in={d_in}], got {list(lora_a.shape)}")
    if num_slots < 1 or rank < 1 or num_segments < 1:
        raise ValueError(f"lora_a must have S >= 1, E >= 1 and r >= 1, got shape {list(lora_a.shape)}")
    lora_b = _require_tensor("lora_b", lora_b, 4)
    _require_float("lora_b", lora_b, x.dtype)
    d_out = lora_b.shape[2]
    _require_shape("lora_b", lora_b, (num_segments, num_slots, d_out, rank), "[S, E, d_out, r]")
    if d_out < 1:
        raise ValueError(f"lora_b must have d_out >= 1, got shape {list(lora_b.shape)}")
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}")
    router = _require_tensor("router", router, 3)
    _require_float("router", router, x.dtype)
    if router_type == "embedding":
        _require_shape("router", router, (num_segments, rank, d_in), "[S, r, d_in] for router_type='embedding'")
    else:
        _require_shape("router", router, (num_segments, num_slots, d_in), "[S, E, d_in] for router_type='linear'")
    if (shared_a is None) != (shared_b is None):
        raise ValueError("shared_a and shared_b must be given together (or both None)")
    if shared_a is not None:
        _require_tensor("shared_a", shared_a, 3)
        _require_tensor("shared_b", shared_b, 3)
        _require_float("shared_a", shared_a, x.dtype)
        _require_float("shared_b", shared_b, x.dtype)
        _require_shape("shared_a", shared_a, (num_segments, rank, d_in), "[S, r, d_in]")
        _require_shape("shared_b", shared_b, (num_segments, d_out, rank), "[S, d_out, r]")
    if expert_mask is not None:
        _require_tensor("expert_mask", expert_mask, 2)
        if expert_mask.dtype != torch.bool:
            raise TypeError(f"expert_mask must be a bool tensor, got {expert_mask.dtype}")
        _require_shape("expert_mask", expert_mask, (num_segments, num_slots), "[S, E]")
    if expert_input is not None:
        _require_tensor("expert_input", expert_input, 2)
        _require_float("expert_input", expert_input, x.dtype)
        _require_shape("expert_input", expert_input, (num_tokens, d_in), "[T, d_in], like x")

    seg_offsets = _require_tensor("seg_offsets", seg_offsets, 1)
    if seg_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seg_offsets must be an int32 or int64 tensor, got {seg_offsets.dtype}")
    _require_shape("seg_offsets", seg_offsets, (num_segments + 1,), "[S+1] with S = lora_a.shape[0]")

    for name, value in (("lora_a", lora_a), ("lora_b", lora_b), ("router", router), ("shared_a", shared_a),
                        ("shared_b", shared_b), ("expert_mask", expert_mask), ("expert_input", expert_input),
                        ("seg_offsets", seg_offsets)):
        if value is not None:
            _require_device(name, value, x.device)

    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > max(num_slots, MAX_PADDED_TOP_K):
        raise ValueError(f"top_k must be <= max(E, {MAX_PADDED_TOP_K}) (E = {num_slots} slots), got {top_k}: "
                         "topk_idx is [T, top_k], so a huge top_k only allocates padding")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")

    if check_values:
        bounds = seg_offsets.tolist()
        if bounds[0] != 0:
            raise ValueError(f"seg_offsets must start at 0, got seg_offsets[0] = {bounds[0]}")
        if bounds[-1] != num_tokens:
            raise ValueError(f"seg_offsets must end at T = x.shape[0] = {num_tokens}, got {bounds[-1]}")
        for s in range(num_segments):
            if bounds[s + 1] < bounds[s]:
                raise ValueError(
                    f"seg_offsets must be non-decreasing, got seg_offsets[{s}] = {bounds[s]} > "
                    f"seg_offsets[{s + 1}] = {bounds[s + 1]}"
                )
    return MoLEShapes(num_tokens, num_segments, num_slots, rank, d_in, d_out)
