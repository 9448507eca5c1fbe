"""Engines run a round's client updates. `SequentialEngine` runs them one at a time on one workload; later engines
(cohort batching, Ray actors) implement the same `run` contract: the result must not depend on the engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from fedamole.data.scenarios import Scenario
from fedamole.fl.client import client_update

__all__ = ["Engine", "SequentialEngine", "ENGINES", "make_engine", "client_seed"]


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """The seed of one client's work in one round (data order, dropout, DP noise)."""
    return (int(seed) * 1_000_003 + int(round_idx) * 10_007 + int(client)) % (2**31 - 1)


class Engine:
    """``run(payloads, round_idx)`` -> one upload per client, in client order."""

    name = "engine"

    def __init__(self, workload_factory: Callable[[], object], scenario: Scenario, seed: int,
                 progress: bool = True) -> None:
        self.workload_factory = workload_factory
        self.scenario = scenario
        self.seed = seed
        self.progress = progress

    def run(self, payloads: Sequence[dict], round_idx: int) -> list[dict]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (actors, GPU memory)."""


class SequentialEngine(Engine):
    """One client after another on a single workload (model instance)."""

    name = "sequential"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._workload = None

    @property
    def workload(self):
        if self._workload is None:
            self._workload = self.workload_factory()
        return self._workload

    def run(self, payloads: Sequence[dict], round_idx: int) -> list[dict]:
        sc = self.scenario
        out = []
        bar = tqdm(list(enumerate(payloads)), desc=f"round {round_idx} clients", leave=False,
                   disable=not self.progress)
        for c, payload in bar:
            out.append(client_update(self.workload, payload, sc.clients[c], client_seed(self.seed, round_idx, c),
                                     kind=sc.kind, choices=sc.choices))
        return out


ENGINES: dict[str, type[Engine]] = {"sequential": SequentialEngine}


def make_engine(name: str, workload_factory, scenario: Scenario, seed: int, progress: bool = True) -> Engine:
    """An engine by name (see `ENGINES`)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {name!r}")
    return ENGINES[name](workload_factory, scenario, seed, progress=progress)
