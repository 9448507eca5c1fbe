"""Argument checks for `mole_lora` on a `MoLEProblem`: each failure is a ValueError/TypeError naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROUTER_TYPES = ("embedding", "linear")
# top_k above E only adds -1 padding to topk_idx [T, top_k]; past this it is surely a mistake (and memory).
MAX_PADDED_TOP_K = 64


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


def validate_problem(problem, check_values: bool = True) -> None:
    """Check every field of a `MoLEProblem` (`expert_mask` may be None: all slots), in the order of the public API's
    arguments: each failure is a ValueError/TypeError that names the argument.

    `check_values=False` skips the data-dependent checks of `seg_offsets` (they need a device->host copy), which
    `torch.compile` cannot trace without a graph break.
    """
    _check_x_and_experts(problem)
    _check_router_and_optional(problem)
    _check_offsets_and_devices(problem)
    _check_config(problem)
    if check_values:
        check_offset_values(problem.seg_offsets.tolist(), problem.x.shape[0])


def _check_x_and_experts(p) -> None:
    x = _require_tensor("x", p.x, 2)
    _require_float("x", x)
    d_in = x.shape[1]
    if d_in < 1:
        raise ValueError(f"x must have d_in >= 1 features, got shape {tuple(x.shape)}")
    lora_a = _require_tensor("lora_a", p.lora_a, 4)
    _require_float("lora_a", lora_a, x.dtype)
    num_segments, num_slots, rank, a_din = lora_a.shape
    if a_din != d_in:
        # x is what varies per call: name it, with the d_in the weights expect.
        raise ValueError(
            f"x must have shape [T, d_in={a_din}] (d_in of lora_a [S, E, r, d_in] = {list(lora_a.shape)}), "
            f"got {list(x.shape)}"
        )
    if num_slots < 1 or rank < 1 or num_segments < 1:
        raise ValueError(f"lora_a must have S >= 1, E >= 1 and r >= 1, got shape {list(lora_a.shape)}")
    lora_b = _require_tensor("lora_b", p.lora_b, 4)
    _require_float("lora_b", lora_b, x.dtype)
    d_out = lora_b.shape[2]
    _require_shape("lora_b", lora_b, (num_segments, num_slots, d_out, rank), "[S, E, d_out, r]")
    if d_out < 1:
        raise ValueError(f"lora_b must have d_out >= 1, got shape {list(lora_b.shape)}")


def _check_router_and_optional(p) -> None:
    """router, shared_a / shared_b, expert_mask, expert_input (x, lora_a and lora_b already checked)."""
    x, (num_segments, num_slots, rank, d_in), d_out = p.x, p.lora_a.shape, p.lora_b.shape[2]
    if p.router_type not in ROUTER_TYPES:
        raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {p.router_type!r}")
    router = _require_tensor("router", p.router, 3)
    _require_float("router", router, x.dtype)
    if p.router_type == "embedding":
        _require_shape("router", router, (num_segments, rank, d_in), "[S, r, d_in] for router_type='embedding'")
    else:
        _require_shape("router", router, (num_segments, num_slots, d_in), "[S, E, d_in] for router_type='linear'")
    shared_a, shared_b, expert_mask, expert_input = p.shared_a, p.shared_b, p.expert_mask, p.expert_input
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
        _require_shape("expert_input", expert_input, (x.shape[0], d_in), "[T, d_in], like x")


def _check_offsets_and_devices(p) -> None:
    seg_offsets = _require_tensor("seg_offsets", p.seg_offsets, 1)
    if seg_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seg_offsets must be an int32 or int64 tensor, got {seg_offsets.dtype}")
    _require_shape("seg_offsets", seg_offsets, (p.lora_a.shape[0] + 1,), "[S+1] with S = lora_a.shape[0]")
    for name in ("lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask", "expert_input", "seg_offsets"):
        value = getattr(p, name)
        if value is not None:
            _require_device(name, value, p.x.device)


def _check_config(p) -> None:
    top_k, scaling, num_slots = p.top_k, p.scaling, p.lora_a.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > max(num_slots, MAX_PADDED_TOP_K):
        raise ValueError(
            f"top_k must be <= max(E, {MAX_PADDED_TOP_K}) (E = {num_slots} slots), got {top_k}: "
            "topk_idx is [T, top_k], so a huge top_k only allocates padding"
        )
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")


def check_launch(p) -> None:
    """What a kernel launcher needs before it computes addresses from shapes: the checks of `validate_problem`
    without the values of seg_offsets. A fast path of plain comparisons (~5x cheaper: the Triton launchers run it on
    every call, after `mole_lora` already validated) accepts only what `validate_problem` accepts; anything else
    goes to `validate_problem`, which raises the named error."""
    try:
        fast = _launch_fast_path(p)
    except (AttributeError, TypeError, ValueError):  # not tensors, or the wrong number of dimensions
        fast = False
    if not fast:
        validate_problem(p, check_values=False)


def _launch_fast_path(p) -> bool:
    x, lora_a, lora_b, router, expert_mask, seg_offsets = (
        p.x,
        p.lora_a,
        p.lora_b,
        p.router,
        p.expert_mask,
        p.seg_offsets,
    )
    shared_a, shared_b, expert_input, top_k, scaling = p.shared_a, p.shared_b, p.expert_input, p.top_k, p.scaling
    num_tokens, d_in = x.shape
    num_segments, num_slots, rank, a_din = lora_a.shape
    d_out = lora_b.shape[2]
    rows = rank if p.router_type == "embedding" else num_slots
    dtype, device = x.dtype, x.device
    return (
        dtype in FLOAT_DTYPES
        and a_din == d_in >= 1
        and num_segments >= 1
        and num_slots >= 1
        and rank >= 1
        and d_out >= 1
        and p.router_type in ROUTER_TYPES
        and lora_b.shape == (num_segments, num_slots, d_out, rank)
        and router.shape == (num_segments, rows, d_in)
        and expert_mask.shape == (num_segments, num_slots)
        and seg_offsets.shape == (num_segments + 1,)
        and lora_a.dtype == lora_b.dtype == router.dtype == dtype
        and expert_mask.dtype == torch.bool
        and seg_offsets.dtype in (torch.int32, torch.int64)
        and lora_a.device == lora_b.device == router.device == expert_mask.device == seg_offsets.device == device
        and (shared_a is None) == (shared_b is None)
        and (
            shared_a is None
            or (
                shared_a.shape == (num_segments, rank, d_in)
                and shared_b.shape == (num_segments, d_out, rank)
                and shared_a.dtype == shared_b.dtype == dtype
                and shared_a.device == shared_b.device == device
            )
        )
        and (
            expert_input is None
            or (
                expert_input.shape == (num_tokens, d_in)
                and expert_input.dtype == dtype
                and expert_input.device == device
            )
        )
        and type(top_k) is int
        and 1 <= top_k <= max(num_slots, MAX_PADDED_TOP_K)
        and type(scaling) in (int, float)
        and math.isfinite(scaling)
    )


def check_offset_values(bounds: list[int], num_tokens: int) -> None:
    """seg_offsets values (read on the host): start at 0, non-decreasing, end at T."""
    if bounds[0] != 0:
        raise ValueError(f"seg_offsets must start at 0, got seg_offsets[0] = {bounds[0]}")
    if bounds[-1] != num_tokens:
        raise ValueError(f"seg_offsets must end at T = x.shape[0] = {num_tokens}, got {bounds[-1]}")
    for s in range(len(bounds) - 1):
        if bounds[s + 1] < bounds[s]:
            raise ValueError(
                f"seg_offsets must be non-decreasing, got seg_offsets[{s}] = {bounds[s]} > "
                f"seg_offsets[{s + 1}] = {bounds[s + 1]}"
            )


def validate_backward_args(problem, grad_delta, grad_probs, probs, topk_idx) -> None:
    """Shapes, dtypes and devices of the backward's extra arguments (the problem's are checked by
    `validate_problem`): grad_delta [T, d_out] like x, grad_probs [T, E] floating or None, probs [T, E] floating,
    topk_idx [T, top_k] int64. The values of topk_idx are each backend's to check."""
    x, top_k, t, e = problem.x, problem.top_k, problem.num_tokens, problem.num_slots
    _require_tensor("grad_delta", grad_delta, 2)
    _require_float("grad_delta", grad_delta, x.dtype)
    _require_shape("grad_delta", grad_delta, (t, problem.d_out), "[T, d_out], like delta")
    _require_tensor("probs", probs, 2)
    _require_float("probs", probs)
    _require_shape("probs", probs, (t, e), "[T, E], the forward's probs")
    _require_tensor("topk_idx", topk_idx, 2)
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be an int64 tensor, got {topk_idx.dtype}")
    _require_shape("topk_idx", topk_idx, (t, top_k), "[T, top_k], the forward's topk_idx")
    if grad_probs is not None:
        _require_tensor("grad_probs", grad_probs, 2)
        _require_float("grad_probs", grad_probs)
        _require_shape("grad_probs", grad_probs, (t, e), "[T, E], like probs")
    for name, value in (
        ("grad_delta", grad_delta),
        ("grad_probs", grad_probs),
        ("probs", probs),
        ("topk_idx", topk_idx),
    ):
        if value is not None:
            _require_device(name, value, x.device)


def topk_errors(topk_idx: Tensor, expert_mask: Tensor, seg_offsets: Tensor) -> Tensor:
    """Per token, whether its top-k ids are invalid: an id other than -1 outside [0, E), a masked slot of the token's
    segment, or a slot twice. Vectorised on topk_idx's device, no host sync (segments found by a search in
    seg_offsets, clamped, so offsets not yet checked cannot index out of range either)."""
    num_tokens, k = topk_idx.shape
    num_segments, num_slots = expert_mask.shape
    tokens = torch.arange(num_tokens, device=topk_idx.device, dtype=seg_offsets.dtype)
    seg_of_token = (torch.searchsorted(seg_offsets, tokens, right=True) - 1).clamp(0, num_segments - 1)
    present = topk_idx >= 0
    in_range = (topk_idx == -1) | (present & (topk_idx < num_slots))
    active = expert_mask[seg_of_token].gather(1, topk_idx.clamp(0, num_slots - 1)) | ~present
    # Padding gets distinct negative ids so that only real slots can repeat.
    ids = torch.where(present, topk_idx, -1 - torch.arange(k, device=topk_idx.device))
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    return ~(in_range & active).all(1) | repeated


def raise_topk_error(topk_idx: Tensor, bad: Tensor) -> None:
    """The ValueError for the first token flagged by `topk_errors` (error path only: reads the row on the host)."""
    token = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"topk_idx[{token}] = {topk_idx[token].tolist()} is invalid: each id must be -1 or an active slot of the "
        "token's segment (expert_mask True), without repeats; pass the forward's topk_idx"
    )
