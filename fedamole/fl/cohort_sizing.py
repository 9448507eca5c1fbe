"""How many clients a cohort takes: bounded by a memory budget and by the batch width that still buys speed.

A training step keeps its activations for the backward pass, and they grow linearly with the cohort: 32 MiniLM
clients in one step held 5.2 GB where one client at a time needs 0.84 GB (issue 11). `CohortSizer` measures the
bytes a training step saves per token once (a probe forward of one client's batch under
``torch.autograd.graph.saved_tensors_hooks``, counting each storage once), adds the stacked adapters and their Adam
state per client, and takes the largest cohort whose step fits in ``max_memory`` minus what the process already
holds. It also stops at ``cohort_tokens`` padded tokens per step: past a few thousand tokens per step a matmul on
CPU runs at its peak anyway, so a larger cohort only costs memory. Both bounds count padded tokens; where the engine
packs the step (`fedamole.packing`), it holds fewer (the default preset: about 70 %), so the memory bound errs on the
safe side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from fedamole.fl.protocol import ClientTask

__all__ = ["CohortSizer", "current_rss", "machine_memory", "DEFAULT_MEMORY_FRACTION", "DEFAULT_COHORT_TOKENS"]

DEFAULT_MEMORY_FRACTION = 0.5
DEFAULT_COHORT_TOKENS = 4096
# The backward's transients (gradients of the activations, allocator slack) on top of the saved tensors: a MiniLM
# cohort grew the peak RSS by 143 MB per client where its saved tensors count 115 MB (benchmarks/results, 2026-12-07).
TRANSIENT_FACTOR = 1.25


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; elsewhere the peak so far, an upper bound)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (the graph is then freed)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class CohortSizer:
    """``size(workload, datas, payload)`` -> clients per cohort (see the module docstring)."""

    def __init__(self, max_memory: int | float | None = None, cohort_tokens: int | None = None) -> None:
        if max_memory is not None and (isinstance(max_memory, bool) or not max_memory > 0):
            raise ValueError(f"max_memory must be a number of bytes > 0 (or None for the default), got {max_memory!r}")
        if cohort_tokens is not None and (
            isinstance(cohort_tokens, bool) or not isinstance(cohort_tokens, int) or cohort_tokens < 1
        ):
            raise ValueError(f"cohort_tokens must be an int >= 1 (or None for the default), got {cohort_tokens!r}")
        self.max_memory = int(max_memory) if max_memory is not None else int(DEFAULT_MEMORY_FRACTION * machine_memory())
        self.cohort_tokens = cohort_tokens or DEFAULT_COHORT_TOKENS
        self._per_token: dict[int, tuple[int, int]] = {}  # batch size -> (saved bytes per token, tokens per step)
        self.last: dict = {}

    def _probe(self, workload, datas: Sequence, batch_size: int) -> tuple[int, int]:
        if batch_size not in self._per_token:
            data = next(d for d in datas if d.train)
            batch = next(workload.batches(data.train, batch_size, steps=1, rng=np.random.default_rng(0)))
            tokens = int(batch["input_ids"].numel())
            model = workload.model
            was_training = model.training
            model.train()
            try:
                with torch.random.fork_rng(devices=[]):
                    saved = _saved_bytes(lambda: workload.loss(batch))
            finally:
                model.train(was_training)
            self._per_token[batch_size] = (max(1, saved // max(tokens, 1)), tokens)
        return self._per_token[batch_size]

    def size(self, workload, datas: Sequence, task: ClientTask) -> int:
        """Clients per cohort for clients ``datas`` running ``task``-shaped work."""
        num = len(datas)
        if not task.steps or not any(d.train for d in datas):
            return max(num, 1)  # evaluation only: no activations kept, the rows are chunked anyway
        per_token, tokens = self._probe(workload, datas, int(task.batch_size or 1))
        adapter = sum(p.numel() * p.element_size() for p in workload.model.parameters() if p.requires_grad)
        # Activations (+ transients) + stacked weights, their grads and Adam's two moments.
        per_client = int(TRANSIENT_FACTOR * per_token * tokens) + 4 * adapter
        budget = self.max_memory - current_rss()
        by_memory = budget // per_client if budget > 0 else 1
        by_tokens = self.cohort_tokens // max(tokens, 1)
        size = int(max(1, min(num, by_memory, by_tokens)))
        self.last = {
            "bytes_per_token": per_token,
            "tokens_per_client_step": tokens,
            "bytes_per_client": per_client,
            "budget": budget,
            "size": size,
        }
        return size
