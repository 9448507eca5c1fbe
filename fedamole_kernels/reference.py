"""Pure-PyTorch reference backend of `mole_lora`: the oracle every other backend is tested against, and the fallback.

Semantics per segment s (tokens ``lo:hi = seg_offsets[s]:seg_offsets[s+1]``), in PyTorch pseudo-code::

    h = einsum("td,erd->ter", x, A[s])                 # expert embeddings A_i x        (embedding router)
    z = (h * (x @ W_t[s].T)[:, None]).sum(-1) / sqrt(r)  # or  z = x @ R[s].T           (linear router)
    p = softmax(z.masked_fill(~mask[s], -inf), -1)     # 0 on masked slots
    idx = topk(p, min(k, active slots)), padded with -1
    w = p[idx] / p[idx].sum(-1)                        # renormalised gates
    u = einsum("td,erd->ter", x_e, A[s])               # x_e = expert_input (x' = dropout(x)) or x
    delta = scaling * sum_{i in idx} w_i * u_i @ B[s, i].T + scaling * (x_e @ A_s[s].T) @ B_s[s].T

Masked means absent: the weights of masked slots are replaced by zeros (selected, never multiplied by a zero gate)
before any product, and their probabilities and gradients are selected to exactly 0, so NaN or Inf in a slot that
does not exist reaches no token and no gradient. The backend checks its own arguments (shapes, dtypes, devices, the
values of seg_offsets and, in the backward, of topk_idx): the custom ops call it with whatever they were given.

Everything is vectorised over a segment's slots; the only Python loop is over segments (clients). Math runs in
float32 (float64 for float64 inputs) whatever the input dtype, so the oracle is as exact as it can be; results are
cast back to the input dtypes. The backward is analytic (no autograd inside), so it doubles as the specification of
the routing backward that the fused kernels implement.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedamole_kernels._validation import check_offset_values, raise_topk_error, topk_errors, validate_backward_args
from fedamole_kernels.backends import Backend
from fedamole_kernels.problem import GRAD_FIELDS, MoLEProblem, compute_dtype

NAME = "reference"


def is_available(device: torch.device) -> bool:
    """The reference runs wherever PyTorch runs."""
    return True


def route_segment(
    x: Tensor, lora_a: Tensor, router: Tensor, mask: Tensor, top_k: int, router_type: str
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Routing for one segment in the compute dtype.

    x [n, d_in]; lora_a [E, r, d_in]; router [r, d_in] or [E, d_in]; mask bool [E].
    Returns probs [n, E] (0 on masked slots), topk_idx [n, top_k] (-1 padded), gates [n, top_k] (renormalised,
    0 where idx = -1), and for the embedding router the expert embeddings h [n, E, r] and token embedding t [n, r].
    """
    n, num_slots = x.shape[0], lora_a.shape[0]
    if router_type == "embedding":
        h = torch.einsum("td,erd->ter", x, lora_a)
        t = x @ router.T
        z = (h * t[:, None, :]).sum(-1) / math.sqrt(lora_a.shape[1])
    else:
        h = t = None
        z = x @ router.T
    # No branch on mask.any() (a device->host sync per segment on a GPU): with every slot masked the softmax row is
    # NaN and the masked_fill zeroes all of it, the same probs = 0.
    probs = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
    kk = min(top_k, num_slots)
    vals, idx = probs.masked_fill(~mask, -1.0).topk(kk, dim=-1)
    idx = torch.where(vals < 0, torch.full_like(idx, -1), idx)
    if kk < top_k:
        idx = torch.cat([idx, idx.new_full((n, top_k - kk), -1)], dim=-1)
    selected = idx >= 0
    picked = probs.gather(1, idx.clamp(min=0)) * selected
    gates = picked / picked.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return probs, idx, gates, h, t


def _dense_gates(idx: Tensor, gates: Tensor, num_slots: int) -> Tensor:
    """[n, top_k] sparse gates -> [n, E] dense (0 for unselected slots)."""
    selected = idx >= 0
    dense = gates.new_zeros(idx.shape[0], num_slots)
    return dense.scatter_add(1, idx.clamp(min=0), gates * selected)


def _segments(bounds: list[int], num_tokens: int) -> list[tuple[int, int, int]]:
    """Non-empty segments (s, lo, hi) of checked bounds."""
    check_offset_values(bounds, num_tokens)
    return [(s, bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1) if bounds[s + 1] > bounds[s]]


def _present(mask: Tensor, weights: Tensor) -> Tensor:
    """`weights` [E, ...] with the slots that do not exist (mask False) replaced by zeros."""
    return torch.where(mask.view(-1, *([1] * (weights.dim() - 1))), weights, 0.0)


def mole_lora_forward(problem: MoLEProblem) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of `mole_lora`. Returns (delta [T, d_out] x.dtype, probs [T, E] f32, idx [T, k])."""
    problem.validate(check_values=False)
    p, x, top_k, scaling = problem, problem.x, problem.top_k, problem.scaling
    # The loop over segments in Python reads the bounds on the host: the one host sync of the forward (the fused
    # backends never read seg_offsets on the host).
    segments = _segments(p.seg_offsets.tolist(), x.shape[0])
    cd = compute_dtype(x)
    num_tokens, num_slots, d_out = x.shape[0], p.num_slots, p.d_out
    delta = x.new_zeros(num_tokens, d_out, dtype=cd)
    probs = x.new_zeros(num_tokens, num_slots, dtype=torch.float32 if cd == torch.float32 else cd)
    topk_idx = torch.full((num_tokens, top_k), -1, dtype=torch.int64, device=x.device)
    for s, lo, hi in segments:
        xs = x[lo:hi].to(cd)
        xe = xs if p.expert_input is None else p.expert_input[lo:hi].to(cd)
        mask = p.expert_mask[s]
        a, b, w_r = _segment_weights(p, s, cd)
        probs_s, idx, gates, h, _ = route_segment(xs, a, w_r, mask, top_k, p.router_type)
        u = h if (p.expert_input is None and h is not None) else torch.einsum("td,erd->ter", xe, a)
        c = _dense_gates(idx, gates, num_slots) * scaling
        out = torch.einsum("ter,eor->to", u * c[..., None], b)
        if p.shared_a is not None:
            out += scaling * (xe @ p.shared_a[s].to(cd).T) @ p.shared_b[s].to(cd).T
        delta[lo:hi] = out
        probs[lo:hi] = probs_s.to(probs.dtype)
        topk_idx[lo:hi] = idx
    return delta.to(x.dtype), probs.to(torch.float32) if cd == torch.float32 else probs, topk_idx


def _segment_weights(p: MoLEProblem, s: int, cd: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Segment s's A [E, r, d_in], B [E, d_out, r] (absent slots zeroed) and router in the compute dtype."""
    mask = p.expert_mask[s]
    a, b = _present(mask, p.lora_a[s].to(cd)), _present(mask, p.lora_b[s].to(cd))
    w_r = p.router[s].to(cd) if p.router_type == "embedding" else _present(mask, p.router[s].to(cd))
    return a, b, w_r


def mole_lora_backward(
    problem: MoLEProblem, grad_delta: Tensor, grad_probs: Tensor | None, probs: Tensor, topk_idx: Tensor
) -> tuple[Tensor | None, ...]:
    """Analytic backward. Returns grads for GRAD_FIELDS (x, expert_input, lora_a, lora_b, router, shared_a, shared_b).

    `probs` and `topk_idx` are the forward outputs (routing is not recomputed, so the backward sees exactly the
    top-k choice the forward made). `grad_probs` may be None (no loss on the probabilities). The grad of
    `expert_input` is None when it was None (its contribution then lands in the grad of x).
    """
    p, x = problem, problem.x
    p.validate(check_values=False)
    validate_backward_args(p, grad_delta, grad_probs, probs, topk_idx)
    # The ids index per-slot tensors below: checked on the device, read with the bounds in the one host sync.
    bad = topk_errors(topk_idx, p.expert_mask, p.seg_offsets)
    *bounds, any_bad = torch.cat([p.seg_offsets.to(torch.int64), bad.any().view(1).to(torch.int64)]).tolist()
    segments = _segments(bounds, x.shape[0])
    if any_bad:
        raise_topk_error(topk_idx, bad)
    cd = compute_dtype(x)
    grads = {}
    for name in GRAD_FIELDS:
        t = getattr(p, name)
        grads[name] = None if t is None else torch.zeros(t.shape, dtype=cd, device=x.device)
    for s, lo, hi in segments:
        g = grad_delta[lo:hi].to(cd)
        gp = None if grad_probs is None else grad_probs[lo:hi]
        _segment_backward(p, grads, s, lo, hi, g, gp, probs[lo:hi], topk_idx[lo:hi], cd)
    return tuple(None if grads[n] is None else grads[n].to(getattr(p, n).dtype) for n in GRAD_FIELDS)


def _segment_backward(p, grads, s, lo, hi, g, grad_probs, probs, idx, cd) -> None:
    """Gradients of segment s (tokens lo:hi) written into `grads` (field name -> buffer in the compute dtype)."""
    xs = p.x[lo:hi].to(cd)
    xe = xs if p.expert_input is None else p.expert_input[lo:hi].to(cd)
    mask = p.expert_mask[s]
    a, b, w_r = _segment_weights(p, s, cd)
    scaling = p.scaling
    prob = torch.where(mask, probs.to(cd), 0.0)
    selected = idx >= 0
    picked = prob.gather(1, idx.clamp(min=0)) * selected
    norm = picked.sum(-1, keepdim=True).clamp_min(torch.finfo(cd).tiny)
    gates = picked / norm
    c = _dense_gates(idx, gates, p.num_slots) * scaling

    u = torch.einsum("td,erd->ter", xe, a)
    g_rank = torch.einsum("to,eor->ter", g, b)  # dL/d(gated u) per slot
    grads["lora_b"][s] = torch.einsum("to,ter->eor", g, u * c[..., None])
    du = g_rank * c[..., None]
    grads["lora_a"][s] = torch.einsum("ter,td->erd", du, xe)
    gxe_seg = torch.einsum("ter,erd->td", du, a)
    if p.shared_a is not None:
        v = xe @ p.shared_a[s].to(cd).T
        grads["shared_b"][s] = scaling * g.T @ v
        dv = scaling * g @ p.shared_b[s].to(cd)
        grads["shared_a"][s] = dv.T @ xe
        gxe_seg += dv @ p.shared_a[s].to(cd)

    # gates w = p[idx] / sum p[idx]  ->  dp on the selected slots; then the masked softmax backward.
    d_gate = scaling * (g_rank * u).sum(-1).gather(1, idx.clamp(min=0)) * selected
    d_picked = (d_gate - (d_gate * gates).sum(-1, keepdim=True)) / norm * selected
    dp = prob.new_zeros(prob.shape).scatter_add(1, idx.clamp(min=0), d_picked)
    if grad_probs is not None:
        dp = dp + torch.where(mask, grad_probs.to(cd), 0.0)
    dz = torch.where(mask, prob * (dp - (prob * dp).sum(-1, keepdim=True)), 0.0)
    gx_seg = _router_backward(p, grads, s, dz, xs, a, w_r)
    if p.expert_input is None:
        grads["x"][lo:hi] = gx_seg + gxe_seg
    else:
        grads["x"][lo:hi] = gx_seg
        grads["expert_input"][lo:hi] = gxe_seg


def _router_backward(p, grads, s, dz, xs, a, w_r) -> Tensor:
    """Scores backward: dz [n, E] -> router (and, for the embedding router, lora_a) gradients; returns the grad of x
    through the scores."""
    if p.router_type == "embedding":
        inv_sqrt_r = 1.0 / math.sqrt(p.rank)
        h = torch.einsum("td,erd->ter", xs, a)
        t = xs @ w_r.T
        dh = dz[..., None] * t[:, None, :] * inv_sqrt_r
        dt = (dz[..., None] * h).sum(1) * inv_sqrt_r
        grads["lora_a"][s] += torch.einsum("ter,td->erd", dh, xs)
        grads["router"][s] = dt.T @ xs
        return torch.einsum("ter,erd->td", dh, a) + dt @ w_r
    grads["router"][s] = dz.T @ xs
    return dz @ w_r


class ReferenceBackend(Backend):
    """The oracle, on any device."""

    name = NAME

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return is_available(device)

    forward = staticmethod(mole_lora_forward)
    backward = staticmethod(mole_lora_backward)
