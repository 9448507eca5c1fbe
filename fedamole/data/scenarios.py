"""Federated scenarios: non-IID partitions and per-client splits (SPEC §3).

* ``dirichlet_partition``: label (or category) skew, one Dirichlet(alpha) draw over clients per label, balanced
  (a client holding N/C examples draws no more), redrawn until every client has at least ``min_samples``.
* ``task_partition``: one distinct task per client (of the largest tasks, the first ones in task-id order).
* ``split_client``: 76 % train / 4 % embedding / 10 % eval / 10 % test (SNLI: `snli_split_fractions`), with caps on
  the three small sets.
* ``drop_long_prompts``: remove examples whose tokenised prompt reaches the maximum length.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Example",
    "ClientData",
    "Scenario",
    "dirichlet_partition",
    "task_partition",
    "split_client",
    "build_scenario",
    "dirichlet_success_probability",
    "SPLIT_FRACTIONS",
    "SNLI_SPLIT_SIZES",
    "split_fractions",
    "snli_split_fractions",
    "task_id",
    "drop_long_prompts",
]


def split_fractions(
    eval_share: float = 0.1, test_share: float = 0.1, embed_share_of_rest: float = 0.05
) -> tuple[float, float, float, float]:
    """(train, embedding, eval, test) shares of a client's examples, as the authors derive them: eval and test take
    their shares, the rest is split 95 : 5 into train and embedding set. Defaults give 76 / 4 / 10 / 10 %."""
    for name, v in (
        ("eval_share", eval_share),
        ("test_share", test_share),
        ("embed_share_of_rest", embed_share_of_rest),
    ):
        if not 0 <= v < 1:
            raise ValueError(f"{name} must lie in [0, 1), got {v!r}")
    rest = 1.0 - eval_share - test_share
    if rest <= 0:
        raise ValueError(f"eval_share + test_share must be < 1, got {eval_share} + {test_share}")
    return (rest * (1 - embed_share_of_rest), rest * embed_share_of_rest, eval_share, test_share)


SPLIT_FRACTIONS = split_fractions()
# SNLI's own split sizes (rows, including those without a gold label), which the authors' eval and test shares follow.
SNLI_SPLIT_SIZES = {"train": 550_152, "validation": 10_000, "test": 10_000}


def snli_split_fractions() -> tuple[float, float, float, float]:
    """Per-client split shares for pooled SNLI: eval and test in the proportions of SNLI's validation and test
    splits to the whole (10,000 / 570,152 each), the rest 95 : 5 train : embedding."""
    total = sum(SNLI_SPLIT_SIZES.values())
    return split_fractions(SNLI_SPLIT_SIZES["validation"] / total, SNLI_SPLIT_SIZES["test"] / total)


@dataclass
class Example:
    """One example. Causal LM: ``text`` is the prompt, ``target`` the response. Sequence classification: ``text``
    is the input and ``label`` the class. ``group`` is what partitions use (label name, category or task)."""

    text: str
    target: str = ""
    label: int = -1
    group: str = ""


@dataclass
class ClientData:
    """A client's four splits."""

    train: list[Example]
    embed: list[Example]
    eval: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "embed", "eval", "test")}


@dataclass
class Scenario:
    """A federated data set: per-client splits plus how to score them.

    kind: "classification" (``choices`` = candidate answers, or ``num_labels`` for sequence classifiers) or
    "generation" (ROUGE-L).
    """

    name: str
    kind: str
    clients: list[ClientData]
    choices: list[str] | None = None
    num_labels: int = 0
    info: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "rouge_l"


def _check_pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def dirichlet_partition(
    labels: Sequence,
    num_clients: int,
    alpha: float,
    min_samples: int = 10,
    seed: int = 0,
    max_tries: int = 1000,
    balanced: bool = True,
) -> list[np.ndarray]:
    """Split example indices over clients with Dirichlet(alpha) label skew.

    For every label in turn, its examples are shuffled and cut according to proportions drawn from
    Dirichlet(alpha * 1_C). With ``balanced`` (the authors' rule) a client that already holds N/C examples
    (N = len(labels)) gets proportion 0 for the remaining labels, the others renormalised, so no client grows far
    beyond its fair share. Small alpha (0.1) gives few labels per client; large alpha (100) is close to IID. Draws
    repeat until each client holds at least ``min_samples`` examples.

    Returns a list of ``num_clients`` sorted index arrays that together cover every index once.
    """
    num_clients = _check_pos_int("num_clients", num_clients)
    min_samples = _check_pos_int("min_samples", min_samples, 0)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    labels = np.asarray(labels)
    n = len(labels)
    if n < num_clients * min_samples:
        raise ValueError(
            f"cannot give {num_clients} clients >= {min_samples} samples each from {n} examples "
            f"({num_clients} x {min_samples} = {num_clients * min_samples} > {n})"
        )
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    for _ in range(max_tries):
        # Count first, build the index lists only for the draw that is kept: a failing try costs O(labels x
        # clients) on top of its permutations, so an infeasible request fails in seconds, not minutes.
        shuffled, all_cuts = [], []
        counts = np.zeros(num_clients, dtype=np.int64)
        for idx in by_label:
            idx = rng.permutation(idx)
            q = rng.dirichlet(np.full(num_clients, float(alpha)))
            if balanced:
                open_ = counts < n / num_clients
                q = q * open_
                # Some client is always below N/C here (fewer than N examples are placed); a Dirichlet draw with a
                # tiny alpha can still underflow to all zeros on the open clients: share evenly among them then.
                q = q / q.sum() if q.sum() > 0 else open_ / open_.sum()
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
            counts += np.diff(cuts, prepend=0, append=len(idx))
            shuffled.append(idx)
            all_cuts.append(cuts)
        if counts.min() >= min_samples:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, cuts in zip(shuffled, all_cuts):
                for c, chunk in enumerate(np.split(idx, cuts)):
                    parts[c].append(chunk)
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {num_clients} clients "
        f">= {min_samples} samples; raise alpha or lower num_clients / min_samples"
    )


def dirichlet_success_probability(
    num_examples: int, num_groups: int, num_clients: int, alpha: float, min_samples: int, max_tries: int = 1000
) -> float:
    """Estimated probability that `dirichlet_partition` finds a draw giving every client >= `min_samples` of
    `num_examples` examples in `num_groups` equal groups, within `max_tries` draws.

    A client's share of one group is Beta(alpha, (C - 1) alpha), close to Gamma(alpha) / (C alpha) for many clients,
    so its total is about n / (L C alpha) x Gamma(L alpha): short with probability p = P(Gamma(L alpha) <
    min_samples L C alpha / n); a draw succeeds with about (1 - p)^C. Measured on the ``tiny`` data (3 labels,
    alpha 1, 60 examples per client) the real limit is 10-40 % above the estimate's median, so the estimate errs
    on the side of refusing a little early."""
    from scipy.special import gammainc

    if num_clients * min_samples > num_examples:
        return 0.0
    shape = num_groups * alpha
    p_short = float(gammainc(shape, min_samples * shape * num_clients / num_examples))
    log_per_try = num_clients * math.log1p(-p_short) if p_short < 1 else -math.inf
    per_try = math.exp(log_per_try)
    return -math.expm1(max_tries * math.log1p(-per_try)) if per_try < 1 else 1.0


def task_id(name: str) -> str:
    """The id part of a task name (``task1385_anli_r1_entailment`` -> ``task1385``): the text before the first ``_``.

    Tasks are ordered by this string as text, as the authors' label encoder orders them (``task1000`` before
    ``task101``); zero-padded ids (BIG-bench's ``subtask001``..``subtask061``) sort numerically either way.
    """
    return str(name).split("_", 1)[0]


def task_partition(
    tasks: Sequence[str], num_clients: int, pool: int | None = 100
) -> tuple[list[np.ndarray], list[str]]:
    """One distinct task per client, as the authors chose Natural Instructions tasks: the ``pool`` largest tasks
    (by example count; ties keep first-seen order; ``None`` = all), then the first ``num_clients`` of those in
    task-id order (`task_id`); client c gets the c-th. Every example of a chosen task goes to its client.

    Returns (index arrays, task names) aligned by client.
    """
    num_clients = _check_pos_int("num_clients", num_clients)
    if pool is not None:
        pool = _check_pos_int("pool", pool)
    tasks = np.asarray(tasks)
    counts = Counter(tasks.tolist())  # insertion-ordered: first-seen order breaks ties in the stable sort below
    largest = sorted(counts, key=lambda t: -counts[t])[:pool]
    if len(largest) < num_clients:
        raise ValueError(
            f"one task per client needs >= num_clients ({num_clients}) distinct tasks, got "
            f"{len(largest)}" + (f" (data.task_pool = {pool})" if pool is not None else "")
        )
    chosen = sorted(largest, key=lambda t: (task_id(t), t))[:num_clients]
    return [np.flatnonzero(tasks == t) for t in chosen], chosen


def split_client(
    examples: Sequence,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
    embed_cap: int | None = 200,
    eval_cap: int | None = 200,
    test_cap: int | None = 200,
    seed: int = 0,
) -> ClientData:
    """Shuffle and split one client's examples into train / embedding / eval / test.

    The three small sets get ``max(1, round(f * n))`` examples each (then capped; examples beyond a cap are dropped,
    so the train set stays its own share); train gets the rest of the uncapped split. Needs at least 4 examples.
    """
    if len(fractions) != 4 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be 4 non-negative numbers summing to 1, got {tuple(fractions)}")
    n = len(examples)
    if n < 4:
        raise ValueError(f"examples: a client needs >= 4 examples to split, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    small = [max(1, int(round(f * n))) for f in fractions[1:]]
    n_train = n - sum(small)
    if n_train < 1:
        raise ValueError(f"examples: {n} examples leave no training data after the small splits {small}")
    bounds = np.cumsum([n_train, *small])[:-1]
    train, emb, ev, te = (list(part) for part in np.split(order, bounds))
    caps = (embed_cap, eval_cap, test_cap)
    emb, ev, te = (s if cap is None else s[:cap] for s, cap in zip((emb, ev, te), caps))
    pick = lambda ids: [examples[i] for i in ids]
    return ClientData(pick(train), pick(emb), pick(ev), pick(te))


def build_scenario(
    name: str,
    examples: Sequence[Example],
    num_clients: int,
    partition: str = "dirichlet",
    alpha: float = 1.0,
    kind: str = "classification",
    choices: list[str] | None = None,
    num_labels: int = 0,
    min_samples: int = 10,
    test_cap: int | None = None,
    seed: int = 0,
    max_per_client: int | None = None,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
    balanced: bool = True,
    task_pool: int | None = 100,
) -> Scenario:
    """Partition ``examples`` over clients (``partition`` = "dirichlet" on ``group``, balanced unless told
    otherwise, or "task": one group per client, see `task_partition`) and split each client by ``fractions``.
    ``test_cap`` defaults to 200 (classification) or 50 (generation); ``max_per_client`` subsamples large clients
    before splitting."""
    if kind not in ("classification", "generation"):
        raise ValueError(f"kind must be 'classification' or 'generation', got {kind!r}")
    groups = [ex.group for ex in examples]
    info: dict = {"partition": partition}
    if partition == "dirichlet":
        parts = dirichlet_partition(groups, num_clients, alpha, min_samples=min_samples, seed=seed, balanced=balanced)
        info.update(alpha=alpha, balanced=balanced)
    elif partition == "task":
        parts, names = task_partition(groups, num_clients, pool=task_pool)
        info["tasks"] = names
    else:
        raise ValueError(f"partition must be 'dirichlet' or 'task', got {partition!r}")
    if test_cap is None:
        test_cap = 200 if kind == "classification" else 50
    rng = np.random.default_rng(seed + 1)
    clients = []
    for c, idx in enumerate(parts):
        if max_per_client is not None and len(idx) > max_per_client:
            idx = np.sort(rng.choice(idx, size=max_per_client, replace=False))
        clients.append(
            split_client([examples[i] for i in idx], fractions=fractions, test_cap=test_cap, seed=seed + 7919 * (c + 1))
        )
    return Scenario(name, kind, clients, choices=choices, num_labels=num_labels, info=info)


def drop_long_prompts(scenario: Scenario, prompt_length: Callable[[str], int], max_length: int) -> Scenario:
    """A copy of ``scenario`` without the examples whose prompt is ``max_length`` tokens or longer, as the authors
    filter every split after capping (their responses are then cut to fit). ``prompt_length(text)`` is the length of
    the tokenised prompt as the model sees it (BOS included). ``info["dropped_long_prompts"]`` counts the drops."""
    max_length = _check_pos_int("max_length", max_length)
    clients, dropped = [], 0
    for c, cd in enumerate(scenario.clients):
        kept = {
            k: [ex for ex in getattr(cd, k) if prompt_length(ex.text) < max_length]
            for k in ("train", "embed", "eval", "test")
        }
        dropped += sum(len(getattr(cd, k)) - len(v) for k, v in kept.items())
        if not kept["train"]:
            raise ValueError(
                f"client {c}: every training prompt is >= model.max_length ({max_length}) tokens; "
                "raise model.max_length"
            )
        clients.append(ClientData(**kept))
    info = {**scenario.info, "dropped_long_prompts": dropped, "max_length": max_length}
    return dataclasses.replace(scenario, clients=clients, info=info)
