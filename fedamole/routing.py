"""How routing results reach the load-balance loss: an explicit recorder, never tensors kept on modules.

    with fedamole.record_routing(model) as routing:
        out = model(**batch)
    loss = out.loss + config.load_balance_coef * routing.load_balance_loss(token_mask=batch["attention_mask"])

While the block is open every MoLE module of `model` appends one `RoutingCall` (probs, top-k ids, active slots) per
call to the recorder; when it closes the modules forget the recorder, so nothing differentiable stays on a module
(`copy.deepcopy(model)` works at any time). `get_mole_model` opens one around every forward and adds the loss to
`outputs.loss` itself (the Hugging Face MoE convention).

Reentrant activation checkpointing (``torch.utils.checkpoint(use_reentrant=True)``, what HF's
`gradient_checkpointing_enable()` uses by default) runs the checkpointed forward under `no_grad`, so the recorded
probabilities carry no graph. For those calls the recorder hands out a `_ReentrantCell`: the recorded value enters the
loss through `_CaptureAuxGrad`, whose backward stores the loss's gradient w.r.t. that module's load-balance term
(whatever scaled it: `load_balance_coef`, gradient accumulation, a GradScaler); when the checkpoint recomputes the
module with grad enabled, the module rebuilds its term and `_ReleaseAuxGrad` feeds it exactly that gradient. The
capture runs first because autograd executes ready nodes newest-first and the capture nodes are created after the
whole forward (tested: reentrant and non-reentrant checkpointing give identical gradients).
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def load_balance_from_routing(
    probs: Tensor,
    topk_idx: Tensor,
    active: Tensor,
    token_mask: Tensor | None = None,
    per_client: bool = False,
    offsets: Tensor | None = None,
) -> Tensor:
    """SPEC §1 load-balance loss of one module: ``|S_c| * sum_i P_i f_i`` per client, summed over clients.

    P_i = mean over the client's tokens of probs[:, i]; f_i = share of its (valid) top-k slots routed to expert i.
    probs [T, E] (differentiable), topk_idx [T, k] (-1 = empty slot), active bool [E] (one client) or [S, E] with
    ``offsets`` int64 [S + 1] (client s's tokens are ``offsets[s]:offsets[s+1]``, a `SegmentPlan`'s token offsets;
    any sizes, empty included). `token_mask` [T] (bool) restricts both means to real tokens (padding excluded), so
    the loss does not depend on how a batch was padded. A client without tokens contributes 0. `per_client=True`
    returns the [S] per-client losses instead of their sum.
    """
    active = active.reshape(-1, active.shape[-1])
    num_clients, num_slots = active.shape
    num_tokens = probs.shape[0]
    weight = probs.new_ones(num_tokens) if token_mask is None else token_mask.reshape(-1).to(probs.dtype)
    if weight.shape[0] != num_tokens:
        raise ValueError(f"token_mask must have {num_tokens} entries (one per token), got {weight.shape[0]}")
    if offsets is None:
        if num_clients != 1:
            raise ValueError(f"offsets (int64 [{num_clients + 1}]) are needed with active for {num_clients} clients")
        client = torch.zeros(num_tokens, dtype=torch.int64, device=probs.device)
    else:
        if offsets.shape != (num_clients + 1,):
            raise ValueError(
                f"offsets must be int64 [{num_clients + 1}] (one per client + 1), got {list(offsets.shape)}"
            )
        sizes = offsets.diff()
        client = torch.repeat_interleave(torch.arange(num_clients, device=probs.device), sizes, output_size=num_tokens)
    valid = (topk_idx >= 0).to(probs.dtype) * weight[:, None]
    # Written without data-dependent branches so it costs no host sync and traces under torch.compile.
    slot = (client[:, None] * num_slots + topk_idx.clamp(min=0)).reshape(-1)
    counts = probs.new_zeros(num_clients * num_slots).index_add(0, slot, valid.reshape(-1))
    counts = counts.reshape(num_clients, num_slots)
    share = counts / probs.new_zeros(num_clients).index_add(0, client, valid.sum(1)).clamp(min=1)[:, None]
    prob_sums = probs.new_zeros(num_clients, num_slots).index_add(0, client, probs * weight[:, None])
    mean_probs = prob_sums / probs.new_zeros(num_clients).index_add(0, client, weight).clamp(min=1)[:, None]
    losses = active.sum(1).to(probs.dtype) * (mean_probs * share).sum(1)
    return losses if per_client else losses.sum()


class _ReentrantCell:
    """The gradient of the loss w.r.t. one no-grad-recorded load-balance term, handed from capture to release."""

    __slots__ = ("token_mask", "grad", "in_loss", "__weakref__")

    def __init__(self) -> None:
        self.token_mask: Tensor | None = None  # set when the loss is built
        self.grad: Tensor | None = None
        self.in_loss = False


class _CaptureAuxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, anchor: Tensor, cell: _ReentrantCell) -> Tensor:
        ctx.cell = cell
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.cell.grad = grad.detach() if ctx.cell.grad is None else ctx.cell.grad + grad.detach()
        return None, None, None


class _ReleaseAuxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta: Tensor, term: Tensor, cell: _ReentrantCell) -> Tensor:
        ctx.cell = cell
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, grad_delta: Tensor):
        grad = ctx.cell.grad
        ctx.cell.grad = None  # consumed: a second backward through the same graph gets its own capture
        return grad_delta, grad, None


@dataclass
class RoutingCall:
    """One call of one MoLE module: probs [T, E] (differentiable), topk_idx [T, k] int64 (-1 = empty), active bool
    [E] or [S, E] (the clients' slots), offsets int64 [S + 1] (each client's tokens, with a `SegmentPlan`; None for
    one client), and the reentrant-checkpoint cell when recorded under no_grad."""

    probs: Tensor
    topk_idx: Tensor
    active: Tensor
    offsets: Tensor | None = None
    cell: _ReentrantCell | None = None


class RoutingRecorder:
    """Collects the `RoutingCall`s of every MoLE module while open (see `record_routing`)."""

    def __init__(self) -> None:
        self.calls: list[RoutingCall] = []
        self.grad_enabled = torch.is_grad_enabled()

    def record(
        self, module: nn.Module, probs: Tensor, topk_idx: Tensor, active: Tensor, offsets: Tensor | None = None
    ) -> None:
        cell = None
        if self.grad_enabled and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            # Inside a reentrant checkpoint's first pass: the module will be recomputed with grad in backward.
            cell = _ReentrantCell()
            module._reentrant_cells.append(weakref.ref(cell))
        self.calls.append(RoutingCall(probs, topk_idx, active, offsets, cell))

    def load_balance_loss(self, token_mask: Tensor | None = None, per_client: bool = False) -> Tensor:
        """Sum over recorded calls of `load_balance_from_routing` (float32 scalar; [S] with `per_client`, every call
        then of the same S clients).

        `token_mask` (e.g. the attention mask [B, L]) keeps real tokens only; every call must have seen exactly
        its B*L tokens. 0 when nothing was recorded."""
        if not self.calls:
            return torch.zeros(())
        terms = []
        anchor = None
        for call in self.calls:
            term = load_balance_from_routing(
                call.probs, call.topk_idx, call.active, token_mask, per_client, call.offsets
            ).float()
            if call.cell is not None and not per_client:
                call.cell.token_mask = None if token_mask is None else token_mask.detach()
                call.cell.in_loss = True
                if anchor is None:
                    anchor = torch.zeros((), device=term.device, requires_grad=True)
                term = _CaptureAuxGrad.apply(term, anchor, call.cell)
            terms.append(term)
        return torch.stack(terms).sum(0)


def release_reentrant_term(
    module: nn.Module, delta: Tensor, probs: Tensor, topk_idx: Tensor, active: Tensor, offsets: Tensor | None = None
) -> Tensor:
    """In a reentrant checkpoint's recomputation, route the captured load-balance gradient into this call."""
    cells: collections.deque = module._reentrant_cells
    while cells:
        cell = cells.popleft()()
        if cell is None or not cell.in_loss:
            continue
        term = load_balance_from_routing(probs, topk_idx, active, cell.token_mask, offsets=offsets).float()
        return _ReleaseAuxGrad.apply(delta, term, cell)
    return delta


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Open a `RoutingRecorder` on every MoLE module of `model` for the duration of the block (nestable)."""
    recorder, modules = open_recorder(model)
    try:
        yield recorder
    finally:
        close_recorder(recorder, modules)


def open_recorder(model: nn.Module) -> tuple[RoutingRecorder, list[nn.Module]]:
    """`record_routing` without the `with` block: a new recorder, open on the returned MoLE modules of `model` until
    `close_recorder(recorder, modules)`. Plain functions, not a generator context manager, so that forward hooks
    using them trace under `torch.compile(fullgraph=True)` (Dynamo cannot keep a live @contextmanager object across
    the pre-hook / post-hook boundary)."""
    recorder = RoutingRecorder()
    modules = [m for m in model.modules() if hasattr(m, "_routing_recorders")]
    for module in modules:
        module._routing_recorders = (*module._routing_recorders, recorder)
        if recorder.grad_enabled:
            # Cells whose loss graph is gone (forward without backward) are dead weak references: drop them.
            module._reentrant_cells = collections.deque(ref for ref in module._reentrant_cells if ref() is not None)
    return recorder, modules


def close_recorder(recorder: RoutingRecorder, modules: list[nn.Module]) -> None:
    """Detach `recorder` from `modules` (what `open_recorder` returned); the recorder keeps its calls."""
    for module in modules:
        module._routing_recorders = tuple(r for r in module._routing_recorders if r is not recorder)
