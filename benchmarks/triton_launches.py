"""The Triton path of one adapted layer, launch by launch, for a problem shape (no GPU, no kernel run).

Mirrors `fedamole_kernels.triton_mole_lora` (mole_lora_forward / mole_lora_backward) and the layer around it
(`MoLELinear.forward`: out = base(x) + delta; dropout on the experts' input in training). Each `Launch` carries what
`triton_resources.py` needs to compile the kernel ahead of time (its scalar arguments and constexprs, tile sizes
excepted: those come from the autotune configs) and what `roofline.py` needs (FLOPs executed, HBM bytes moved).

FLOPs count the tensor-core work the kernels issue, with the rank padded to R = max(16, next_pow2(r)) and the slots
to EP = max(2, next_pow2(E)) in the routing kernels (that is what they multiply). Bytes are compulsory HBM traffic:
each activation read or written once, each segment's weights once (re-reads across token tiles hit L2: the largest
stacked weight here, A of 30 experts at r = 16, d = 4096 in bf16, is 3.9 MB per segment against 50 MB of L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedamole_kernels.triton_mole_configs import route_group

# The SPEC's shape grid (issue 14, item 4a) and the reference setup of the "why it can be fast" section.
GRID = {"d": (4096,), "T": (1, 512, 8192), "E": (6, 8, 30), "r": (8, 16), "S": (1, 10, 64)}
REFERENCE = dict(T=4096, d=4096, E=8, r=16, S=1)


def pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclass(frozen=True)
class Problem:
    T: int
    S: int
    E: int
    r: int
    d_in: int
    d_out: int
    top_k: int = 2
    shared: bool = True
    dropout: bool = True  # training: x_e = dropout(x) feeds the experts (HAS_XE)
    embed: bool = True  # the embedding router (the default)
    lb_loss: bool = True  # the load-balance loss gives probs a gradient (HAS_GP)
    elt: int = 2  # bytes per element (bf16)

    @property
    def ku(self) -> int:
        return self.E * self.r + self.r * self.shared

    @property
    def kx(self) -> int:
        return self.ku + (self.r if self.embed else self.E)


@dataclass
class Launch:
    name: str  # what the launch does in the layer
    kernel: str  # Triton kernel (function in triton_mole_kernels) or "torch" for an ATen kernel
    kind: str = ""  # autotune config family: route / gemm / wgrad
    flops: float = 0.0
    bytes: float = 0.0
    scalars: dict = field(default_factory=dict)
    ptrs: dict = field(default_factory=dict)  # pointer argument -> element type (default: the activation dtype)
    constexprs: dict = field(default_factory=dict)
    glue: bool = False  # layer glue (add, dropout, error flag), not a MoLE kernel proper


_IDX = {"seg_ptr": "i64", "idx_ptr": "i64", "mask_ptr": "i1", "probs_ptr": "fp32", "gp_ptr": "fp32", "err_ptr": "i32"}
_FLAGS = dict(UPCAST=False, PREC="tf32")


def _route_consts(p: Problem) -> dict:
    ep = pow2(p.E, 2)
    return dict(SP=pow2(p.S, 2), EP=ep, R=pow2(p.r, 16), TOPK=p.top_k, GE=route_group(ep, pow2(p.r, 16)),
                EMBED=p.embed, HAS_XE=p.dropout,
                HAS_SHARED=p.shared, **_FLAGS)  # fmt: skip


def _shrink_flops(p: Problem, with_router_h: bool) -> float:
    ep, rp = pow2(p.E, 2), pow2(p.r, 16)
    cols = ep * rp * (1 + (p.dropout and p.embed and with_router_h)) + rp * p.embed + rp * p.shared
    cols += 0 if p.embed else max(16, ep)
    return 2.0 * p.T * p.d_in * cols


def _weights(p: Problem) -> float:
    """Elements of A, W_t (or R), A_s (d_in side) and B, B_s (d_out side), all segments."""
    return p.S * (p.E * p.r * p.d_in + (p.r if p.embed else p.E) * p.d_in + p.r * p.d_in * p.shared), p.S * (
        p.E * p.r * p.d_out + p.r * p.d_out * p.shared
    )


def _gemm(p: Problem, name: str, kd: int, n: int, w3: bool, acc: bool = False) -> Launch:
    e = p.elt
    scal = dict(S=p.S, T=p.T, KD=kd, N=n)
    return Launch(name, "_seg_gemm", "gemm", flops=2.0 * p.T * kd * n,
                  bytes=e * (p.T * kd + p.S * kd * n + p.T * n * (1 + acc)), scalars=scal, ptrs=dict(_IDX),
                  constexprs=dict(SP=pow2(p.S, 2), HAS_W2=p.shared, HAS_W3=w3, ACC=acc, MASK_W3=w3 and not p.embed,
                                  **_FLAGS))  # fmt: skip


def _wgrad(p: Problem, name: str, kd: int, n: int, two: bool, o3: bool) -> Launch:
    e = p.elt
    reads = (p.T * kd + p.T * n) * (1 + two)
    return Launch(name, "_seg_wgrad", "wgrad", flops=2.0 * p.T * kd * n * (1 + two),
                  bytes=e * (reads + p.S * kd * n), scalars=dict(T=p.T, KD=kd, N=n), ptrs=dict(_IDX),
                  constexprs=dict(HAS_D2=two, HAS_O2=p.shared, HAS_O3=o3, **_FLAGS))  # fmt: skip


def _flag_launches(direction: str) -> list[Launch]:
    """The error flag: torch.zeros(2) before, err.eq(0), .all() and torch._assert_async after (4 tiny launches)."""
    return [Launch(f"{direction}: error flag ({op})", "torch", bytes=8.0, glue=True)
            for op in ("zero fill", "eq", "all", "assert_async")]  # fmt: skip


def forward_launches(p: Problem) -> list[Launch]:
    e, (wd, _) = p.elt, _weights(p)
    x_reads = p.T * p.d_in * (1 + p.dropout)
    out = []
    if p.dropout:  # x_e = dropout(x): read x, write x_e and the keep mask (1 byte)
        out.append(Launch("fwd: dropout(x)", "torch", bytes=p.T * p.d_in * (2 * e + 1), glue=True))
    out += _flag_launches("fwd")[:1]
    out.append(Launch(
        "fwd: route_shrink (H = x [A|W_t|A_s]^T, softmax, top-k, gates -> UV)", "_route_shrink_fwd", "route",
        flops=_shrink_flops(p, True),
        bytes=e * (x_reads + wd + p.T * p.ku) + 4 * p.T * p.E + 8 * p.T * p.top_k,
        scalars=dict(S=p.S, T=p.T, E=p.E, r=p.r, d_in=p.d_in, KU=p.ku, scaling=2.0, inv_sqrt_r=p.r**-0.5),
        ptrs=dict(_IDX), constexprs=dict(_route_consts(p), ZP=max(16, pow2(p.E, 2))),
    ))  # fmt: skip
    out.append(_gemm(p, "fwd: expand (delta = UV [B|B_s]^T)", p.ku, p.d_out, w3=False))
    out += _flag_launches("fwd")[1:]
    out.append(Launch("fwd: out = base(x) + delta", "torch", bytes=3 * e * p.T * p.d_out, glue=True))
    return out


def backward_launches(p: Problem) -> list[Launch]:
    e, (wd, wo) = p.elt, _weights(p)
    ep, rp = pow2(p.E, 2), pow2(p.r, 16)
    x_reads = p.T * p.d_in * (1 + p.dropout)
    bufs = p.T * (p.ku + p.kx * (1 + p.dropout))
    out = _flag_launches("bwd")[:1]
    out.append(Launch(
        "bwd: route_bwd (recompute shrink, G = g [B|B_s], routing backward)", "_route_bwd", "route",
        flops=_shrink_flops(p, True) + 2.0 * p.T * p.d_out * (ep * rp + rp * p.shared),
        bytes=e * (p.T * p.d_out + x_reads + wd + wo + bufs) + 4 * p.T * p.E * (1 + p.lb_loss) + 8 * p.T * p.top_k,
        scalars=dict(S=p.S, T=p.T, E=p.E, r=p.r, d_in=p.d_in, d_out=p.d_out, KU=p.ku, KX=p.kx, scaling=2.0,
                     inv_sqrt_r=p.r**-0.5),
        ptrs=dict(_IDX), constexprs=dict(_route_consts(p), HAS_GP=p.lb_loss),
    ))  # fmt: skip
    out.append(_wgrad(p, "bwd: seg_wgrad dB, dB_s = UG^T g", p.ku, p.d_out, two=False, o3=False))
    out.append(_wgrad(p, "bwd: seg_wgrad dA, dA_s, dW_t = Dx^T x (+ Dxe^T x_e)", p.kx, p.d_in, p.dropout, True))
    out.append(_gemm(p, "bwd: seg_gemm dx = Dx [A|A_s|W_t]", p.kx, p.d_in, w3=True))
    if p.dropout:
        out.append(_gemm(p, "bwd: seg_gemm dx_e = Dxe [A|A_s|W_t]", p.kx, p.d_in, w3=True))
        out.append(Launch("bwd: dropout backward (dx_e * mask / keep)", "torch", bytes=p.T * p.d_in * (2 * e + 1),
                          glue=True))  # fmt: skip
        out.append(Launch("bwd: dx += dropout grad", "torch", bytes=3 * e * p.T * p.d_in, glue=True))
    out += _flag_launches("bwd")[1:]
    out.append(Launch("bwd: dx = base input grad + MoLE dx", "torch", bytes=3 * e * p.T * p.d_in, glue=True))
    return out


def layer_launches(p: Problem) -> list[Launch]:
    """Forward + backward of the adapted layer's MoLE part on the Triton path (the base GEMMs not included)."""
    return forward_launches(p) + backward_launches(p)


def base_launches(p: Problem) -> list[Launch]:
    """The frozen base linear alone: forward GEMM y = x W0^T and input-gradient GEMM dx = dy W0 (bf16)."""
    e, w = p.elt, p.d_in * p.d_out
    return [
        Launch("base fwd: y = x W0^T", "cublas", flops=2.0 * p.T * w, bytes=e * (p.T * p.d_in + w + p.T * p.d_out)),
        Launch("base bwd: dx = dy W0", "cublas", flops=2.0 * p.T * w, bytes=e * (p.T * p.d_out + w + p.T * p.d_in)),
    ]


def grid_problems(**overrides) -> list[Problem]:
    return [
        Problem(T=t, S=s, E=e, r=r, d_in=d, d_out=d, **overrides)
        for d in GRID["d"]
        for t in GRID["T"]
        for e in GRID["E"]
        for r in GRID["r"]
        for s in GRID["S"]
        if s <= max(t, 1)
    ]
