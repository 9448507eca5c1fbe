"""Dropout with a cheap mask on CPU: the same op as `torch.nn.functional.dropout`, its random draws 7.7x faster.

    keep = keep_mask(x.shape, p)                  # bool, P(keep) = 1 - p_eff with |p_eff - p| <= 2**-17
    out = x * keep * (1 / (1 - p_eff))            # = dropout(x, p, training=True)

Why: on CPU, `torch.nn.functional.dropout` draws one Bernoulli per element with torch's Mersenne Twister
(`aten::bernoulli_`): 5.1 ms for the mask of a [2200, 384] fp32 tensor on a 2-core AMD EPYC, and 17.6 % of the
simulation's MiniLM cohort training steps (31 dropout calls per step; `benchmarks/profile_cohort_step.py`, results
`profile-cohort-step-2026-12-07*.txt`). Here 16 random bits per element come from numpy's PCG64 (``random_raw``:
four elements per 64-bit draw) and one comparison: 0.67 ms for the same mask; the whole dropout is 3.6x faster
forward and 2.1x forward+backward (`benchmarks/bench_dropout.py`, `dropout-2026-12-07.json`, load 0.5).

The keep probability is realised to 2**-16 (p = 0.1 gives p_eff = 6554 / 65536 = 0.100006), as FlashAttention
realises it to 2**-8; the scale uses p_eff, so the expectation of the output is exactly x.

Each call draws its 64-bit seed from torch's default CPU generator, so `torch.manual_seed` makes the masks
reproducible (and a checkpointed RNG state resumes them). Elsewhere (CUDA, where torch's Philox dropout is fast;
under `torch.compile`; small tensors, where the seed costs more than it saves) `dropout` is torch's own.

Layers: `torch.library.custom_op` ``fedamole::dropout_keep_mask`` (+ `register_fake`; no autograd: a mask has no
gradient) -> `_ScaleByMask` (autograd.Function: the product with the mask, saving the bool mask only) -> functional
`keep_mask` / `dropout`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dropout", "keep_mask", "quantized_drop_probability"]

_LEVELS = 1 << 16  # random bits per element
MIN_ELEMENTS = 4096  # below this, torch's own dropout (the seed draw and numpy call cost ~10 us)


def _threshold(p: float) -> int:
    return int(round(p * _LEVELS))


def quantized_drop_probability(p: float) -> float:
    """The drop probability `keep_mask` realises for ``p``: round(p * 2**16) / 2**16."""
    return _threshold(p) / _LEVELS


@torch.library.custom_op("fedamole::dropout_keep_mask", mutates_args=())
def _keep_mask(shape: list[int], p: float, seed: int) -> Tensor:
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.random.PCG64(seed).random_raw((count + 3) // 4)
    keep = raw.view(np.uint16)[:count] >= _threshold(p)
    return torch.from_numpy(keep).view(shape)


@_keep_mask.register_fake
def _(shape: list[int], p: float, seed: int) -> Tensor:
    return torch.empty(shape, dtype=torch.bool)


def keep_mask(shape: torch.Size | list[int], p: float, generator: torch.Generator | None = None) -> Tensor:
    """bool CPU tensor of ``shape``, each element True with probability 1 - `quantized_drop_probability` (p),
    independently; seeded from ``generator`` (default: torch's default CPU generator)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return _keep_mask([int(s) for s in shape], float(p), seed)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`torch.nn.functional.dropout` (x, p, training) with the mask of `keep_mask` on CPU (see the module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    cheap = x.device.type == "cpu" and x.numel() >= MIN_ELEMENTS and x.is_floating_point()
    if not cheap or p == 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    threshold = _threshold(p)
    if threshold == _LEVELS:
        return x * 0.0
    return _ScaleByMask.apply(x, keep_mask(x.shape, p), _LEVELS / (_LEVELS - threshold))


class _ScaleByMask(torch.autograd.Function):
    """x * keep * scale, saving only the bool mask (a byte per element, as torch's dropout): the plain product
    x * (keep.to(x.dtype) * scale) is a little faster but saves 4 bytes per element (at 25 dropout sites of a
    2,000-token MiniLM cohort step, [2000, 384] each: 58 MB more)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None
