"""Segments as data: one batch, many clients, each with its own adapters (SPEC §4).

    plan = SegmentPlan([0, 8, 8, 13])              # rows 0-7: client 0, none for client 1, rows 8-12: client 2
    with use_segments(model, weights, plan):       # weights: {module name: ClientWeights of S = 3 clients}
        out = model(input_ids=ids, attention_mask=mask)   # ids [13, L]

A `SegmentPlan` says which rows of a batch belong to which client (any number of rows per client, empty included,
no equal-block rule, no padding between clients). While `use_segments` is open every MoLE module of `model` reads
its weights from the caller's `ClientWeights` (client-stacked tensors owned by the caller, e.g. the cohort engine:
nothing is swapped into the model) and splits its input by the plan: a module called with x [R, L, d] (R = the
plan's rows) gives client s the tokens of rows ``row_offsets[s]:row_offsets[s+1]``, and one `mole_lora` call serves
every client. The plan's token offsets are computed once per token count and shared by all modules. Extra trainable
modules (a classification head) can be served per client too (``extra``): their input's leading dimension is split
by sequences (= rows, unless the batch is packed: `fedamole.packing`) or rows, and each client's part goes through
the module with that client's stacked parameters.

Routing results (probs, top-k ids, active slots, token offsets) reach the caller through `record_routing`, whose
`load_balance_loss(per_client=True)` gives each client its own load-balance term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedamole.layers import MoLEExperts

__all__ = ["ClientWeights", "SegmentPlan", "use_segments"]


@dataclass(frozen=True)
class ClientWeights:
    """One MoLE module's tensors for S clients: lora_a [S, E, r, d_in], lora_b [S, E, d_out, r], router
    [S, r or E, d_in], shared_a [S, r, d_in] and shared_b [S, d_out, r] (None without a shared expert), active bool
    [S, E] (the slots each client holds). Shapes are checked against the module by `use_segments`."""

    lora_a: Tensor
    lora_b: Tensor
    router: Tensor
    shared_a: Tensor | None
    shared_b: Tensor | None
    active: Tensor

    @property
    def num_clients(self) -> int:
        return int(self.lora_a.shape[0])

    def as_tuple(self) -> tuple:
        return self.lora_a, self.lora_b, self.router, self.shared_a, self.shared_b, self.active


class SegmentPlan:
    """Rows ``row_offsets[s]:row_offsets[s+1]`` of a batch are client s's (non-decreasing, starting at 0).

    ``sequence_offsets`` (default: the row offsets) say the same of the batch's sequences when rows hold several
    (a packed batch, `fedamole.packing`): what works per sequence (pooling, the classification head, the task loss)
    splits by them."""

    def __init__(self, row_offsets: Sequence[int], sequence_offsets: Sequence[int] | None = None) -> None:
        self.row_offsets = _offsets("row_offsets", row_offsets)
        self.sequence_offsets = (
            self.row_offsets if sequence_offsets is None else _offsets("sequence_offsets", sequence_offsets)
        )
        if len(self.sequence_offsets) != len(self.row_offsets):
            raise ValueError(
                f"sequence_offsets must have one entry per row offset ({len(self.row_offsets)}), "
                f"got {len(self.sequence_offsets)}"
            )
        self._cache: dict[tuple, Tensor] = {}  # token offsets and token -> client ids, per (token count, device)

    @classmethod
    def from_counts(cls, rows_per_client: Sequence[int], sequence_offsets: Sequence[int] | None = None) -> SegmentPlan:
        """The plan of consecutive blocks of ``rows_per_client[s]`` rows."""
        offsets = [0]
        for n in rows_per_client:
            if int(n) < 0:
                raise ValueError(f"rows_per_client must be >= 0, got {list(rows_per_client)}")
            offsets.append(offsets[-1] + int(n))
        return cls(offsets, sequence_offsets)

    @property
    def num_sequences(self) -> int:
        return self.sequence_offsets[-1]

    def sequence_client_ids(self, device: torch.device | str | None = None) -> Tensor:
        """The client of every sequence, int64 [N] (= `row_client_ids` unless rows are packed)."""
        return _client_ids(self.sequence_offsets, device)

    @property
    def num_clients(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_rows(self) -> int:
        return self.row_offsets[-1]

    def rows(self, client: int) -> slice:
        return slice(self.row_offsets[client], self.row_offsets[client + 1])

    def row_client_ids(self, device: torch.device | str | None = None) -> Tensor:
        """The client of every row, int64 [R]."""
        return _client_ids(self.row_offsets, device)

    def token_client_ids(self, num_tokens: int, device: torch.device) -> Tensor:
        """The client of every token of an input of ``num_tokens`` (rows x tokens per row), int64 [num_tokens]
        (cached: every module of a forward asks for the same)."""
        key = ("clients", num_tokens, device)
        ids = self._cache.get(key)
        if ids is None:
            offsets = self.token_offsets(num_tokens, device)
            clients = torch.arange(self.num_clients, device=device)
            ids = self._cache[key] = torch.repeat_interleave(clients, offsets.diff(), output_size=num_tokens)
        return ids

    def token_offsets(self, num_tokens: int, device: torch.device) -> Tensor:
        """int64 [S + 1] token offsets of an input of ``num_tokens`` = rows x tokens per row (cached)."""
        key = (num_tokens, device)
        offsets = self._cache.get(key)
        if offsets is None:
            rows = self.num_rows
            if rows == 0 or num_tokens % rows:
                raise ValueError(
                    f"an input of {num_tokens} tokens does not split into the plan's {rows} rows; the model must be "
                    "called with the plan's rows as its leading dimension"
                )
            per_row = num_tokens // rows
            offsets = torch.tensor(self.row_offsets, dtype=torch.int64).mul_(per_row).to(device)
            self._cache[key] = offsets
        return offsets


def _offsets(name: str, values: Sequence[int]) -> list[int]:
    offsets = [int(o) for o in values]
    if len(offsets) < 2 or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must start at 0 and not decrease (S + 1 >= 2 entries), got {offsets}")
    return offsets


def _client_ids(offsets: list[int], device: torch.device | str | None) -> Tensor:
    counts = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])])
    return torch.repeat_interleave(torch.arange(len(offsets) - 1), counts).to(device)


def _check_client_weights(name: str, module: MoLEExperts, weights: ClientWeights, num_clients: int) -> None:
    if not isinstance(weights, ClientWeights):
        raise TypeError(f"weights[{name!r}] must be a ClientWeights, got {type(weights).__name__}")
    if weights.num_clients != num_clients or weights.lora_a.dim() != 4:
        raise ValueError(
            f"weights[{name!r}].lora_a must be [S, E, r, d_in] with S = {num_clients} (the plan's clients), "
            f"got {list(weights.lora_a.shape)}"
        )
    module._check_weights(weights.as_tuple())


def _extra_hook(plan: SegmentPlan, stacked: Mapping[str, Tensor], name: str):
    """Forward hook: the module's output recomputed per client with that client's stacked parameters."""

    busy = []  # the per-client calls below run the module (and so this hook) again: leave those alone

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if busy:
            return None
        x = args[0]
        if x.shape[0] == plan.num_sequences:
            bounds = plan.sequence_offsets
        elif x.shape[0] == plan.num_rows:
            bounds = plan.row_offsets
        else:
            raise ValueError(
                f"extra module {name!r}: input's leading dimension {x.shape[0]} is neither the plan's "
                f"{plan.num_sequences} sequences nor its {plan.num_rows} rows"
            )
        parts = []
        busy.append(True)
        try:
            for s in range(plan.num_clients):
                if bounds[s + 1] > bounds[s]:
                    params = {key: value[s] for key, value in stacked.items()}
                    parts.append(functional_call(module, params, (x[bounds[s] : bounds[s + 1]],)))
        finally:
            busy.clear()
        return torch.cat(parts) if parts else output

    return hook


@contextlib.contextmanager
def use_segments(
    model: nn.Module,
    weights: Mapping[str, ClientWeights],
    plan: SegmentPlan,
    extra: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> Iterator[SegmentPlan]:
    """Run `model`'s MoLE modules (every one of them must be in ``weights``, keyed by module name) and the
    ``extra`` modules ({module name: {parameter name: [S, ...]}}) per client as ``plan`` says, for the block."""
    if not isinstance(plan, SegmentPlan):
        raise TypeError(f"plan must be a SegmentPlan, got {type(plan).__name__}")
    modules = {n: m for n, m in model.named_modules() if isinstance(m, MoLEExperts)}
    missing = sorted(set(modules) - set(weights))
    unknown = sorted(set(weights) - set(modules))
    if missing or unknown:
        raise ValueError(f"weights must name every MoLE module of the model: missing {missing}, unknown {unknown}")
    for name, module in modules.items():
        _check_client_weights(name, module, weights[name], plan.num_clients)
    hooks = []
    try:
        for name, module in modules.items():
            module._segment = (weights[name].as_tuple(), plan)
        for name, stacked in (extra or {}).items():
            for key, value in stacked.items():
                if value.shape[0] != plan.num_clients:
                    raise ValueError(f"extra[{name!r}][{key!r}] must have {plan.num_clients} clients first")
            hooks.append(model.get_submodule(name).register_forward_hook(_extra_hook(plan, stacked, name)))
        yield plan
    finally:
        for module in modules.values():
            module._segment = None
        for hook in hooks:
            hook.remove()
