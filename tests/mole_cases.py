"""Shared problem generator for the `mole_lora` backend tests, and an independent per-token oracle.

`naive_mole_lora` is written from SPEC §1 token by token, with plain Python loops and autograd, deliberately sharing
no code with `fedamole_kernels.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (name, segment lengths, E, r, d_in, d_out, top_k, masks per segment as strings of 1/0 or None)
CASES = [
    ("basic", [5], 4, 3, 7, 5, 2, None),
    ("one_token", [1], 3, 2, 5, 3, 2, None),
    ("single_expert_below_k", [4], 1, 2, 6, 4, 2, None),
    ("k_equals_e", [5], 3, 2, 5, 6, 3, None),
    ("k_above_e", [3], 2, 2, 4, 3, 4, None),
    ("empty_segments", [0, 4, 0, 3, 0], 3, 2, 5, 4, 2, None),
    ("hetero_masks", [3, 4, 2, 3], 4, 3, 6, 5, 2, ["1111", "1010", "0100", "0000"]),
    ("odd_sizes", [7, 2], 5, 3, 9, 11, 3, ["11011", "10111"]),
]


@dataclass
class Problem:
    x: torch.Tensor
    seg_offsets: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    router: torch.Tensor
    shared_a: torch.Tensor | None
    shared_b: torch.Tensor | None
    expert_mask: torch.Tensor | None
    expert_input: torch.Tensor | None
    top_k: int
    scaling: float
    router_type: str

    def float_inputs(self) -> dict[str, torch.Tensor]:
        names = ("x", "lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_input")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def kwargs(self, **overrides) -> dict:
        args = dict(
            x=self.x,
            seg_offsets=self.seg_offsets,
            lora_a=self.lora_a,
            lora_b=self.lora_b,
            router=self.router,
            shared_a=self.shared_a,
            shared_b=self.shared_b,
            expert_mask=self.expert_mask,
            expert_input=self.expert_input,
            top_k=self.top_k,
            scaling=self.scaling,
            router_type=self.router_type,
        )
        args.update(overrides)
        return args

    def cast(self, dtype: torch.dtype, device="cpu", requires_grad: bool = True) -> Problem:
        def conv(t):
            if t is None:
                return None
            if t.is_floating_point():
                return t.detach().to(device=device, dtype=dtype).requires_grad_(requires_grad)
            return t.to(device)

        return Problem(
            **{k: conv(v) if isinstance(v, torch.Tensor) or v is None else v for k, v in self.__dict__.items()}
        )


def segment_offsets(lengths) -> torch.Tensor:
    """int64 seg_offsets [S+1] of segments with these token counts."""
    return torch.tensor([0, *torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def slot_mask(masks) -> torch.Tensor | None:
    """expert_mask bool [S, E] from one string of 1/0 per segment (None: all slots)."""
    return None if masks is None else torch.tensor([[c == "1" for c in m] for m in masks], dtype=torch.bool)


def make_problem(
    lengths,
    num_slots,
    rank,
    d_in,
    d_out,
    top_k,
    masks,
    router_type="embedding",
    shared=True,
    expert_input=False,
    dtype=torch.float64,
    seed=0,
    skew=False,
) -> Problem:
    """Random problem; B is non-zero so every gradient path is exercised. `skew` sends every token to slot 0."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_segments = sum(lengths), len(lengths)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    offsets = segment_offsets(lengths)
    x = rand(num_tokens, d_in)
    lora_a = rand(num_segments, num_slots, rank, d_in, scale=0.7)
    router_rows = rank if router_type == "embedding" else num_slots
    router = rand(num_segments, router_rows, d_in, scale=0.7)
    if skew:  # a constant feature that only slot 0 (and the token projection) reads loudly
        x[:, 0] = 3.0
        if router_type == "embedding":
            lora_a[:, 0, :, 0] = 10.0
            router[:, :, 0] = 10.0
        else:
            router[:, 0, 0] = 20.0
    mask = slot_mask(masks)
    return Problem(
        x=x,
        seg_offsets=offsets,
        lora_a=lora_a,
        lora_b=rand(num_segments, num_slots, d_out, rank, scale=0.5),
        router=router,
        shared_a=rand(num_segments, rank, d_in, scale=0.5) if shared else None,
        shared_b=rand(num_segments, d_out, rank, scale=0.5) if shared else None,
        expert_mask=mask,
        expert_input=rand(num_tokens, d_in) if expert_input else None,
        top_k=top_k,
        scaling=1.5,
        router_type=router_type,
    )


def naive_mole_lora(p: Problem):
    """Token-by-token SPEC §1 with Python loops: (delta [T, d_out], probs [T, E], list of selected-slot sets)."""
    num_segments, num_slots, rank = p.lora_a.shape[:3]
    bounds = p.seg_offsets.tolist()
    rows_delta, rows_probs, chosen = [], [], []
    for s in range(num_segments):
        active = [i for i in range(num_slots) if p.expert_mask is None or bool(p.expert_mask[s, i])]
        for t in range(bounds[s], bounds[s + 1]):
            x = p.x[t]
            xe = x if p.expert_input is None else p.expert_input[t]
            out = p.scaling * (p.shared_b[s] @ (p.shared_a[s] @ xe)) if p.shared_a is not None else None
            probs = [x.new_zeros(()) for _ in range(num_slots)]
            picked = []
            if active:
                if p.router_type == "embedding":
                    tok = p.router[s] @ x
                    scores = torch.stack([(p.lora_a[s, i] @ x) @ tok / math.sqrt(rank) for i in active])
                else:
                    scores = torch.stack([p.router[s, i] @ x for i in active])
                soft = torch.softmax(scores, dim=0)
                for j, i in enumerate(active):
                    probs[i] = soft[j]
                order = sorted(range(len(active)), key=lambda j: -float(soft[j].detach()))
                picked = [active[j] for j in order[: min(p.top_k, len(active))]]
                total = sum(probs[i] for i in picked)
                for i in picked:
                    term = p.scaling * (probs[i] / total) * (p.lora_b[s, i] @ (p.lora_a[s, i] @ xe))
                    out = term if out is None else out + term
            if out is None:
                out = x.new_zeros(p.lora_b.shape[2])
            rows_delta.append(out)
            rows_probs.append(torch.stack(probs))
            chosen.append(set(picked))
    d_out = p.lora_b.shape[2]
    delta = torch.stack(rows_delta) if rows_delta else p.x.new_zeros(0, d_out)
    probs = torch.stack(rows_probs) if rows_probs else p.x.new_zeros(0, num_slots)
    return delta, probs, chosen


def all_problems():
    """(id, kwargs for make_problem) over CASES x routers x shared x expert_input."""
    out = []
    for name, lengths, e, r, d_in, d_out, k, masks in CASES:
        for router in ("embedding", "linear"):
            for shared in (True, False):
                for xe in (False, True):
                    pid = f"{name}-{router}-{'shared' if shared else 'noshared'}-{'xe' if xe else 'x'}"
                    out.append(
                        (
                            pid,
                            dict(
                                lengths=lengths,
                                num_slots=e,
                                rank=r,
                                d_in=d_in,
                                d_out=d_out,
                                top_k=k,
                                masks=masks,
                                router_type=router,
                                shared=shared,
                                expert_input=xe,
                            ),
                        )
                    )
    return out
