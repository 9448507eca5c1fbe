"""Feasibility checks of a configuration, run before anything is built: can the data be split over the clients, and
does an expert assignment fit them (`fedamole.simulation.presets.SimConfig.validate` and
`fedamole.simulation.builders.build_data`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedamole.data import GEN_TASKS
from fedamole.data.scenarios import dirichlet_success_probability

if TYPE_CHECKING:
    from fedamole.simulation.presets import SimConfig

__all__ = ["MIN_SPLIT_PROBABILITY", "check_data_feasible", "check_algorithm_feasible"]

# A Dirichlet split less likely than this to succeed within its tries is refused before any data is built.
MIN_SPLIT_PROBABILITY = 0.01


def _synthetic_cls_size(d: dict, clients: int) -> int:
    # 60 examples per client (at least 240) so that `--clients N` works without touching the data settings.
    return d.get("n") or max(240, 60 * clients)


def check_data_feasible(cfg: SimConfig, num_examples: int | None = None, num_groups: int | None = None) -> None:
    """Raise ValueError, naming ``clients`` (--clients) and the largest count that fits, when the data cannot be
    split over ``cfg.clients`` clients with the configuration's partition.

    Without `num_examples` / `num_groups` (the size and label or task count of the loaded data), only the
    synthetic sources are checked, from their configured size, before anything is built; `build_data` calls it
    again with the loaded data's figures. A Dirichlet split is refused when it is estimated to succeed with
    probability < 1 % (`dirichlet_success_probability`)."""
    d, clients = cfg.data, cfg.clients
    source, partition, min_samples = d.get("source"), d.get("partition", "dirichlet"), d.get("min_samples", 10)
    if source == "ni":  # build_data always splits it by task
        partition = "task"
    size = lambda c: num_examples  # noqa: E731 - the loaded data does not grow with the client count
    if source == "synthetic-gen":
        partition, num_groups, size = "task", len(GEN_TASKS), lambda c: None
    elif source == "synthetic-cls" and num_examples is None:
        num_groups, size = d.get("num_labels", 3), lambda c: _synthetic_cls_size(d, c)
    elif num_groups is None:
        return
    where = f"clients (--clients) is {clients}, but the {source} data"
    if partition == "task":
        if clients > num_groups:
            raise ValueError(
                f"{where} has {num_groups} tasks (one per client with data.partition: task): at most "
                f"{num_groups} clients"
            )
        return
    alpha = d.get("alpha", 1.0)

    def feasible(c: int) -> bool:
        n = size(c)
        return (
            c * min_samples <= n
            and dirichlet_success_probability(n, num_groups, c, alpha, min_samples) >= MIN_SPLIT_PROBABILITY
        )

    if feasible(clients):
        return
    lo, hi = 0, clients  # feasible(lo) or lo == 0; not feasible(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    raise ValueError(
        f"{where} ({size(clients)} examples, {num_groups} labels) cannot give every client >= "
        f"{min_samples} examples (data.min_samples) under Dirichlet(data.alpha={alpha}): the estimated "
        f"limit is about {lo} clients (below it a split may still fail, depending on the seed); lower "
        "--clients, or raise data.alpha or data.n"
    )


def check_algorithm_feasible(cfg: SimConfig) -> None:
    """Raise ValueError, naming the ``fedamole`` settings, when no expert assignment fits ``cfg.clients``."""
    from fedamole.fl.fedamole_algo import FedAMoLE
    from fedamole.fl.rsea import check_feasible
    from fedamole.simulation.presets import make_algorithm

    algo = make_algorithm(cfg)
    if not isinstance(algo, FedAMoLE):
        return
    try:
        lo, hi = algo._bounds(cfg.clients)  # what `FedAMoLE.setup` checks, before anything is built
        check_feasible(algo.num_experts, cfg.clients, algo.k_c, lo, hi)
    except ValueError as exc:
        raise ValueError(
            f"fedamole settings (num_experts, clients_per_expert, min_experts, max_experts) do not fit "
            f"{cfg.clients} clients (--clients): {exc}"
        ) from exc
