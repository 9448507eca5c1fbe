"""Parity harness shared by tests/test_parity.py and the backend-specific test files.

A case is a small `mole_lora` problem (`Case`); `check_parity(backend, case, dtype, device)` runs it through the
public API (`mole_lora(..., backend=name)`) on leaf copies of the float inputs, forward and backward, and compares
delta, probs, topk_idx and every gradient with the reference backend run in the same dtype.

Tolerance (one table, per dtype): let `truth` be the reference run in float64 (same inputs before rounding to the
dtype; output gradients are multiples of 1/8, exact in every dtype), and err(a, b) = max|a - b| / max|truth| (1 where
truth is all zero). A backend passes on a tensor when

    err(backend, reference) <= MULTIPLE[dtype] * err(reference, truth) + FLOOR[dtype]

i.e. it may be a few times as far from the reference as the reference in that dtype (input rounding and arithmetic)
is from float64, plus a small floor in units of the dtype's machine epsilon (the floor covers tensors the reference
happens to compute exactly, e.g. all of float64, and rank-space buffers a kernel keeps in the input dtype).
Structural results are exact: dtypes, shapes, topk_idx, probs of masked slots (0), and the weight gradients of
masked slots and empty segments (0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fedamole_kernels import mole_lora

from mole_cases import segment_offsets, slot_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# MULTIPLE x the reference's own error against float64, plus FLOOR x eps(dtype).
EPS = {name: torch.finfo(dt).eps for name, dt in DTYPES.items()}
TOLERANCE = {
    # dtype: (multiple, floor in eps of the dtype). Worst seen on the cpu / Triton-interpreter backends over CASES:
    # fp64 7.3 eps; fp32 3.6 eps or 2.4x the reference's error; bf16 1.4 eps; fp16 0.8 eps.
    "fp64": (4.0, 32.0),
    "fp32": (4.0, 16.0),
    "bf16": (2.0, 2.0),
    "fp16": (2.0, 2.0),
}

FLOAT_INPUTS = ("x", "expert_input", "lora_a", "lora_b", "router", "shared_a", "shared_b")


@dataclass(frozen=True)
class Case:
    """Segment lengths, shapes and options of one problem; masks are one string of 1/0 per segment."""

    lengths: tuple[int, ...]
    experts: int = 4
    rank: int = 4
    d_in: int = 19
    d_out: int = 11
    top_k: int = 2
    router: str = "embedding"
    shared: bool = True
    expert_input: bool = False
    mask: tuple[str, ...] | None = None
    skew: bool = False
    probs_loss: bool = True
    seed: int = 0


def _lengths_s64() -> tuple[int, ...]:
    return tuple((0, 1, 0, 2)[i % 4] for i in range(64))  # 64 segments, half of them empty, 48 tokens


CASES = {
    "basic": Case((13,)),
    "odd_sizes": Case((37, 6), experts=5, rank=3, d_in=23, d_out=9, top_k=3, router="linear", expert_input=True),
    "one_token": Case((1,), d_in=5, d_out=3),
    "no_tokens": Case((0, 0)),
    "e1_below_k": Case((9,), experts=1, shared=False),
    "e1_linear_k1": Case((5,), experts=1, top_k=1, router="linear"),
    "k_equals_e": Case((11,), experts=3, top_k=3, rank=16, d_in=40, d_out=37),
    "k_above_e_masked": Case((6, 5), top_k=5, mask=("1011", "0100")),
    "empty_segments": Case((0, 9, 0, 14, 0), expert_input=True),
    "masked_segments": Case((8, 5, 7, 6), mask=("1011", "0001", "1111", "0000")),
    "all_masked_linear": Case((4, 5), experts=3, router="linear", mask=("000", "110")),
    "no_shared_xe": Case((13, 4), experts=5, rank=3, top_k=3, shared=False, expert_input=True),
    "no_shared_xe_masked_linear": Case((7, 9), router="linear", shared=False, expert_input=True, mask=("1101", "0100")),
    "skew_embedding": Case((30,), skew=True),
    "skew_linear": Case((30,), skew=True, router="linear", top_k=1),
    "no_probs_grad": Case((10, 7), probs_loss=False),
    "top1_six_slots": Case((12,), experts=6, top_k=1),
    "s64_many_empty": Case(_lengths_s64(), experts=2, rank=2, d_in=9, d_out=7, top_k=1),
    "many_tokens": Case((150, 3, 200), d_in=40, d_out=70),
    # 30 slots: the Triton routing kernels loop over slot groups (EP * R = 32 * 16 > ROUTE_GROUP_COLS).
    "e30_groups": Case((9, 6), experts=30, top_k=4, mask=("1" * 30, "0110" * 7 + "01")),
    "e30_groups_xe": Case((11,), experts=30, rank=5, top_k=3, shared=False, expert_input=True),
    "e30_groups_linear": Case((7, 4), experts=30, top_k=2, router="linear", mask=("1" * 30, "1" * 15 + "0" * 15)),
    "e30_groups_linear_xe": Case((8,), experts=30, rank=16, top_k=5, router="linear", expert_input=True),
}

# Larger shapes, only where a GPU runs them (the interpreter would take minutes).
GPU_CASES = {
    "bench_like": Case((125,) * 8, experts=8, rank=8, d_in=256, d_out=384, mask=("11111100",) * 8),
    "r16_linear_xe": Case((259, 259, 259), experts=8, rank=16, d_in=200, d_out=130, router="linear", expert_input=True),
    "d1024_segments": Case((512, 256, 1024), experts=8, rank=16, d_in=1024, d_out=1024),
}


def make_inputs(case: Case) -> dict:
    """Float64 inputs (weights ~ N(0, 1/d_in) so that routing is neither flat nor one-hot) and int/bool tensors."""
    gen = torch.Generator().manual_seed(case.seed)
    num_segments, num_tokens = len(case.lengths), sum(case.lengths)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    s_in, s_r = case.d_in**-0.5, case.rank**-0.5
    router_rows = case.rank if case.router == "embedding" else case.experts
    t = {
        "x": rand(num_tokens, case.d_in),
        "lora_a": rand(num_segments, case.experts, case.rank, case.d_in, scale=s_in),
        "lora_b": rand(num_segments, case.experts, case.d_out, case.rank, scale=s_r),
        "router": rand(num_segments, router_rows, case.d_in, scale=s_in),
        "shared_a": rand(num_segments, case.rank, case.d_in, scale=s_in) if case.shared else None,
        "shared_b": rand(num_segments, case.d_out, case.rank, scale=s_r) if case.shared else None,
        "expert_input": rand(num_tokens, case.d_in) if case.expert_input else None,
    }
    if case.skew:  # a constant feature that slot 0 reads loudly: every token routes to slot 0 first
        t["x"][:, 0] = 3.0
        if case.router == "embedding":
            t["lora_a"][:, 0, :, 0] = 1.0
            t["router"][:, :, 0] = 1.0
        else:
            t["router"][:, 0, 0] = 3.0
    return {"floats": t, "seg_offsets": segment_offsets(case.lengths), "expert_mask": slot_mask(case.mask)}


def output_grads(case: Case, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fixed output gradients for delta and probs: multiples of 1/8 in [-1, 1], exact in every dtype."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    num_tokens = sum(case.lengths)
    g_delta = torch.randint(-8, 9, (num_tokens, case.d_out), generator=gen).double() / 8
    g_probs = torch.randint(-8, 9, (num_tokens, case.experts), generator=gen).double() / 8
    return g_delta.to(device), g_probs.to(device) if case.probs_loss else None


def run(backend: str, case: Case, inputs: dict, dtype: torch.dtype, device: str, grads: tuple) -> dict:
    """Forward + backward through the public op; inputs are cast to `dtype` (float64 copies of rounded values for
    the float64 truth). Returns delta, probs, topk_idx and the gradient of every given float input."""
    leaves = {
        k: v.to(dtype).to(device).requires_grad_() for k, v in inputs["floats"].items() if v is not None
    }  # fmt: skip
    mask = inputs["expert_mask"]
    delta, probs, idx = mole_lora(
        **{k: leaves.get(k) for k in FLOAT_INPUTS},
        seg_offsets=inputs["seg_offsets"].to(device),
        expert_mask=None if mask is None else mask.to(device),
        top_k=case.top_k,
        scaling=1.5,
        router_type=case.router,
        backend=backend,
    )
    g_delta, g_probs = grads
    loss = (delta.double() * g_delta).sum()
    if g_probs is not None:
        loss = loss + (probs.double() * g_probs).sum()
    names = list(leaves)
    got = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True) if loss.requires_grad else []
    got = list(got) or [None] * len(names)
    out = {"delta": delta.detach(), "probs": probs.detach(), "topk_idx": idx}
    for n, g in zip(names, got):
        out[f"grad_{n}"] = torch.zeros_like(leaves[n]) if g is None else g
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor, truth: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    scale = truth.double().abs().max().item() or 1.0
    return (a.double().cpu() - b.double().cpu()).abs().max().item() / scale


def structural_zeros(case: Case, name: str, shape: torch.Size) -> torch.Tensor | None:
    """Bool mask of the entries of gradient `name` that must be exactly 0 (masked slots, empty segments)."""
    if name not in ("grad_lora_a", "grad_lora_b", "grad_router", "grad_shared_a", "grad_shared_b"):
        return None
    zero = torch.zeros(shape, dtype=torch.bool)
    for s, n in enumerate(case.lengths):
        if n == 0:
            zero[s] = True
        elif case.mask is not None and name in ("grad_lora_a", "grad_lora_b"):
            for e, c in enumerate(case.mask[s]):
                zero[s, e] = c == "0"
    return zero


@functools.lru_cache(maxsize=256)
def reference_run(case: Case, dtype_name: str, device: str) -> dict:
    """The reference on `case` in `dtype_name` (cached: every backend, and every dtype for float64, compares to it)."""
    return run("reference", case, make_inputs(case), DTYPES[dtype_name], device, output_grads(case, device))


def check_parity(backend: str, case: Case, dtype_name: str, device: str = "cpu") -> dict:
    """Assert `backend` matches the reference on `case` in `dtype_name`; returns the error ratios by tensor."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case)
    ref, truth = reference_run(case, dtype_name, device), reference_run(case, "fp64", device)
    out = run(backend, case, inputs, dtype, device, output_grads(case, device))

    probs_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out["delta"].dtype == dtype and out["probs"].dtype == probs_dtype and out["topk_idx"].dtype == torch.int64
    assert set(out) == set(ref), f"outputs differ: {sorted(out)} vs {sorted(ref)}"
    assert torch.equal(out["topk_idx"].cpu(), ref["topk_idx"].cpu()), "topk_idx differs from the reference"
    if case.skew:
        assert bool((ref["topk_idx"][:, 0] == 0).all()), "skewed routing should send every token to slot 0 first"
    if case.mask is not None:
        masked = torch.repeat_interleave(~inputs["expert_mask"], torch.tensor(case.lengths), dim=0)
        assert (out["probs"].cpu()[masked] == 0).all(), "masked slots must get probability 0"

    multiple, floor = TOLERANCE[dtype_name]
    ratios = {}
    for name in ref:
        if name == "topk_idx":
            continue
        got, want = out[name], ref[name]
        assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype}"
        zero = structural_zeros(case, name, got.shape)
        if zero is not None:
            assert (got.cpu()[zero] == 0).all(), f"{name} is not exactly 0 on masked slots / empty segments"
        err_ref = relative_error(want, truth[name], truth[name])
        err = relative_error(got, want, truth[name])
        tol = multiple * err_ref + floor * EPS[dtype_name]
        assert err <= tol, f"{name}: error {err:.3g} vs reference > {tol:.3g} (reference vs fp64: {err_ref:.3g})"
        ratios[name] = (err, err_ref)
    return ratios
