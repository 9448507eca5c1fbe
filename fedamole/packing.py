"""Sequence packing: a padded many-client batch rewritten as rows that hold several sequences each (SPEC §4).

    batch, plan = pack_rows(batch, plan, causal=False)      # fewer rows, almost no padding
    bias = attention_bias(batch["sequence_ids"], causal=False, dtype=torch.float32)   # [R, 1, W, W]

A padded batch spends its padding's share of every per-token layer on nothing: the default preset's steps are 35 %
padding. `pack_rows` lays each client's sequences (its rows' real tokens) into rows of the batch's width by
first-fit decreasing, a client's rows staying consecutive so that the packed batch still splits by a `SegmentPlan`
of rows (its ``sequence_offsets`` say whose each sequence is). Every token keeps its own position (``position_ids``
restart at 0 per sequence) and attends only to its own sequence (`attention_bias`: block-diagonal, causal inside
the block for a causal LM), so each sequence's outputs equal its padded row's up to floating-point rounding.
Whether a backbone honours 4-D masks and position ids is for the workload to check (`fedamole.fl.workload`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedamole.segments import SegmentPlan

__all__ = ["PackedLayout", "attention_bias", "pack_layout", "pack_rows", "sequence_sums"]


@dataclass(frozen=True)
class PackedLayout:
    """Where every sequence lies in the packed batch: ``row[n]``, first column ``start[n]`` and ``length[n]`` of
    sequence n (client-major, each client's in its original order); ``rows_per_client`` of width ``width``."""

    row: list[int]
    start: list[int]
    length: list[int]
    width: int
    rows_per_client: list[int]

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_client)


def pack_layout(lengths_per_client: list[list[int]], width: int) -> PackedLayout:
    """First-fit decreasing of each client's sequence lengths into rows of ``width`` (each length in 1..width)."""
    row, start, length, rows_per_client = [], [], [], []
    first_row = 0
    for lengths in lengths_per_client:
        if any(n < 1 or n > width for n in lengths):
            raise ValueError(f"sequence lengths must be in 1..{width} (the width), got {lengths}")
        free: list[int] = []  # room left in each of this client's rows
        place = [(0, 0)] * len(lengths)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = next((r for r, room in enumerate(free) if room >= lengths[i]), len(free))
            if r == len(free):
                free.append(width)
            place[i] = (r, width - free[r])
            free[r] -= lengths[i]
        for (r, s), n in zip(place, lengths):
            row.append(first_row + r)
            start.append(s)
            length.append(n)
        rows_per_client.append(len(free))
        first_row += len(free)
    return PackedLayout(row, start, length, width, rows_per_client)


def pack_rows(batch: dict[str, Tensor], plan: SegmentPlan, causal: bool) -> tuple[dict[str, Tensor], SegmentPlan]:
    """``batch`` (``input_ids`` [B, L], ``attention_mask`` [B, L] marking real tokens, optional ``labels`` [B] or
    [B, L], other per-token [B, L] or per-sequence [B, ...] tensors; its rows split by ``plan``) packed:
    ``input_ids``, ``attention_mask`` (real tokens), ``position_ids`` and ``sequence_ids`` (the sequence of each
    token, -1 on padding) of [R, L] with R <= B; per-token labels packed like the tokens (-100 on padding and on each
    sequence's first token, which no label of the padded batch predicts either), other per-token tensors packed with
    0 on padding, per-sequence tensors as given; and the plan of the packed rows (``sequence_offsets`` = the old row
    offsets).

    The batch comes back unchanged, with ``plan``, when packing saves no row or a row has no real token."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    width = int(mask.shape[1])
    if plan.num_rows != len(lengths):
        raise ValueError(f"plan must split the batch's {len(lengths)} rows, it has {plan.num_rows}")
    if not lengths or min(lengths) < 1:
        return batch, plan
    per_client = [lengths[plan.rows(s)] for s in range(plan.num_clients)]
    layout = pack_layout(per_client, width)
    if layout.num_rows >= len(lengths):
        return batch, plan
    device = mask.device
    length = torch.tensor(layout.length, device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device), length)
    first_token = torch.cumsum(length, 0) - length
    offset_in_seq = torch.arange(int(length.sum()), device=device) - first_token[seq_of_token]
    row = torch.tensor(layout.row, device=device)[seq_of_token]
    col = torch.tensor(layout.start, device=device)[seq_of_token] + offset_in_seq
    where = row * width + col  # each real token's place in the packed [R, L], in row-major token order

    def scatter(values: Tensor, fill: int) -> Tensor:
        out = values.new_full((layout.num_rows * width,), fill)
        return out.index_put_((where,), values[mask]).view(layout.num_rows, width)

    out = {
        "input_ids": scatter(batch["input_ids"], 0),
        "attention_mask": scatter(batch["attention_mask"], 0),
        "position_ids": scatter(torch.arange(width, device=device).expand_as(mask), 0),
        "sequence_ids": scatter(torch.arange(len(lengths), device=device)[:, None].expand_as(mask), -1),
    }
    for key, value in batch.items():
        if key in out:
            continue
        if key == "labels" and value.shape == mask.shape:
            value = scatter(value, -100)
            value.view(-1)[where[first_token]] = -100
        elif value.shape == mask.shape:  # any other per-token input (token type ids): packed like the tokens
            value = scatter(value, 0)
        elif value.shape[:1] != mask.shape[:1]:
            raise ValueError(
                f"batch[{key!r}] must be per token [B, L] or per sequence [B, ...], got {list(value.shape)}"
            )
        out[key] = value
    new_plan = SegmentPlan.from_counts(layout.rows_per_client, sequence_offsets=plan.row_offsets)
    return out, new_plan


def attention_bias(sequence_ids: Tensor, causal: bool, dtype: torch.dtype) -> Tensor:
    """Additive attention mask [R, 1, W, W] of a packed batch: 0 where query and key are in the same sequence (and,
    when ``causal``, the key is not after the query), the dtype's minimum elsewhere. Padding attends to padding only,
    so no row of the softmax is empty."""
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    if causal:
        width = sequence_ids.shape[1]
        same &= torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    bias = torch.zeros(same.shape, dtype=dtype, device=sequence_ids.device)
    return bias.masked_fill_(~same, torch.finfo(dtype).min).unsqueeze(1)


def sequence_sums(values: Tensor, weights: Tensor, sequence_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence of a packed batch: (the sum of ``weights`` x ``values`` over its tokens [N, ...], the sum of its
    weights [N]), N = the largest id + 1. ``values`` [R, W, ...], ``weights`` and ``sequence_ids`` [R, W]; padding
    (id -1) must have weight 0."""
    ids = sequence_ids.reshape(-1).clamp(min=0)
    num = int(sequence_ids.max()) + 1
    weight = weights.reshape(-1).to(values.dtype)
    flat = values.reshape(ids.numel(), -1) * weight[:, None]
    sums = values.new_zeros(num, flat.shape[1]).index_add_(0, ids, flat)
    return sums.view(num, *values.shape[sequence_ids.dim() :]), values.new_zeros(num).index_add_(0, ids, weight)
