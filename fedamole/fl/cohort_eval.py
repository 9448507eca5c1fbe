"""A cohort's evaluation and embedding statistics, all clients per forward (SPEC §3 steps 4-5, §4).

Every client's rows (test examples, candidate-answer pairs, prompts, embedding-set examples) are laid end to end
in client order and cut into chunks of at most ``rows`` rows; each chunk is one forward under `use_segments`, its
`SegmentPlan` giving each client its rows (possibly none) with that client's stacked adapters. Per-row results are
reduced per client afterwards, so a client's metric is the one it would get alone up to floating-point rounding
(rows are packed where the backbone allows it, `fedamole.packing`, else padded to the chunk's widest; the attention
mask keeps other sequences and padding out of every real token).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fedamole.fl.cohort_stack import ClientStack
from fedamole.fl.protocol import EmbeddingStats
from fedamole.metrics import accuracy_from_losses, rouge_l
from fedamole.segments import SegmentPlan, use_segments

__all__ = ["chunks", "evaluate_cohort", "cohort_stats", "EVAL_ROWS"]

EVAL_ROWS = 64  # rows per evaluation forward (no activations are kept, so wider than a training step)


def chunks(items: Sequence[Sequence], rows: int) -> Iterator[tuple[list, SegmentPlan, list[tuple[int, int]]]]:
    """(items of the chunk, its plan over all S clients, (client, item index) of each row) for consecutive chunks of
    at most ``rows`` of the clients' items laid end to end."""
    flat = [(c, i) for c, client_items in enumerate(items) for i in range(len(client_items))]
    for start in range(0, len(flat), rows):
        where = flat[start : start + rows]
        counts = [0] * len(items)
        for c, _ in where:
            counts[c] += 1
        yield [items[c][i] for c, i in where], SegmentPlan.from_counts(counts), where


def _per_row(
    stack: ClientStack, model, items, rows: int, score: Callable, prepare: Callable | None = None
) -> list[list]:
    """``score(batch)`` of every item, run per chunk under the chunk's plan; returned per client. ``prepare(chunk
    items, plan)`` makes the batch and its plan (a packed batch has its own), else the batch is the items."""
    out: list[list] = [[] for _ in items]
    for chunk, plan, where in chunks(items, rows):
        batch, plan = prepare(chunk, plan) if prepare else (chunk, plan)
        with use_segments(model, stack.weights(), plan, extra=stack.extra_params()):
            values = score(batch)
        values = values.tolist() if isinstance(values, Tensor) else list(values)
        for (c, _), value in zip(where, values):
            out[c].append(value)
    return out


def _packing(workload, collate: Callable[[list], dict]) -> Callable:
    """`_per_row`'s ``prepare``: the chunk's items collated, then packed where the backbone allows it."""
    return lambda chunk, plan: workload.pack(collate(chunk), plan)


@torch.no_grad()
def evaluate_cohort(
    workload, stack: ClientStack, tests: Sequence[Sequence], kind: str, choices=None, rows: int = EVAL_ROWS
) -> list[float]:
    """`workload.evaluate` of each client's test set with its stacked adapters: accuracy (sequence classifier:
    argmax; causal LM: lowest mean candidate loss) or mean ROUGE-L F (causal-LM generation). NaN without tests."""
    model = workload.model
    was_training = model.training
    model.eval()
    try:
        if hasattr(workload, "row_predictions"):
            preds = _per_row(stack, model, tests, rows, workload.row_predictions, _packing(workload, workload.collate))
            scores = [
                float(np.mean(np.array(p) == np.array([ex.label for ex in t]))) if t else None
                for p, t in zip(preds, tests)
            ]
        elif kind == "classification":
            if not choices:
                raise ValueError("choices: candidate answers are needed to score causal-LM classification")
            pairs = [workload.candidate_pairs(t, choices) for t in tests]
            losses = _per_row(stack, model, pairs, rows, workload.row_losses, _packing(workload, workload._pad))
            scores = [
                accuracy_from_losses(np.asarray(loss, np.float32).reshape(len(t), -1), [ex.label for ex in t])
                if t
                else None
                for loss, t in zip(losses, tests)
            ]
        else:
            prompts = [[ex.text for ex in t] for t in tests]
            texts = _per_row(stack, model, prompts, rows, workload.generate_rows)
            scores = [
                float(np.mean(rouge_l(p, [ex.target for ex in t], workload.rouge))) if t else None
                for p, t in zip(texts, tests)
            ]
    finally:
        model.train(was_training)
    return [float("nan") if s is None else s for s in scores]


@torch.no_grad()
def cohort_stats(
    workload, stack: ClientStack, examples: Sequence[Sequence], rows: int = EVAL_ROWS
) -> list[EmbeddingStats]:
    """`fedamole.fl.client.embedding_stats` of every client with its stacked adapters, from the mean input x_bar of
    each module over the client's real tokens: t = W_t x_bar (embedding router) or x_bar (linear router), and
    e_i = A_i x_bar for each active slot i (the means of W_t x and A_i x over tokens, by linearity)."""
    model = workload.model
    num = stack.num_clients
    sums = {name: None for name in stack.modules}
    counts = torch.zeros(num, dtype=torch.float64)
    current: dict = {}

    def make_hook(name, module):
        def hook(_module, args):
            x = args[0].reshape(-1, module.in_features).double()
            client = current["plan"].token_client_ids(x.shape[0], x.device)
            weight = current["mask"].reshape(-1).to(x.dtype)
            part = x.new_zeros(num, x.shape[1]).index_add(0, client, x * weight[:, None])
            sums[name] = part if sums[name] is None else sums[name] + part

        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in stack.modules.items()]
    was_training = model.training
    model.eval()
    try:
        for chunk, plan, _ in chunks(examples, rows):
            batch, plan = workload.pack(workload.collate(chunk), plan)
            mask = batch["attention_mask"].bool()
            current.update(plan=plan, mask=mask)
            with use_segments(model, stack.weights(), plan, extra=stack.extra_params()):
                workload.forward_tokens(batch)
            per_row = mask.sum(1).double().cpu()
            counts.index_add_(0, plan.row_client_ids(), per_row)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [_client_stats(stack, sums, counts, s) for s in range(num)]


def _client_stats(stack: ClientStack, sums: dict, counts: Tensor, client: int) -> EmbeddingStats:
    out = EmbeddingStats(t={}, e={})
    n = max(float(counts[client]), 1.0)
    for name, module in stack.modules.items():
        total = sums[name]
        x_bar = (
            total[client] / n if total is not None else torch.zeros(module.in_features, dtype=torch.float64)
        ).float()
        kinds = stack.mole[name]
        if module.config.router == "embedding":
            k = int(stack.active[name][client].sum())
            out.t[name] = (kinds["router"][client].detach().float() @ x_bar).cpu()
            out.e[name] = (kinds["lora_a"][client, :k].detach().float() @ x_bar).cpu()
        else:
            out.t[name] = x_bar.cpu()
    return out
