"""Engines run a round's client updates. `SequentialEngine` runs them one at a time on one workload; later engines
(cohort batching, Ray actors) implement the same `run` contract (one `ClientTask` per client in, one `ClientResult`
per client out): the result must not depend on the engine."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from fedamole.data.scenarios import Scenario
from fedamole.fl.client import client_update
from fedamole.fl.protocol import ClientResult, ClientTask

__all__ = ["Engine", "SequentialEngine", "ENGINES", "engine_class", "make_engine", "client_seed", "run_client_safely"]


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """The seed of one client's work in one round (data order, dropout, DP noise)."""
    return (int(seed) * 1_000_003 + int(round_idx) * 10_007 + int(client)) % (2**31 - 1)


def run_client_safely(work: Callable[[], ClientResult]) -> ClientResult:
    """Run one client's work; an exception becomes a failed `ClientResult` (its error text) so the round goes on."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - any client fault must be contained, reported and skipped
        return ClientResult.failed(f"{type(exc).__name__}: {exc}")


def update_client(owner, task: ClientTask, client: int, round_idx: int) -> ClientResult:
    """One client's round on `owner`'s workload and scenario (an engine, or a Ray actor: ``.workload``,
    ``.scenario``, ``.seed``), with its own seed; any fault, building the workload included, is contained."""
    sc = owner.scenario
    return run_client_safely(
        lambda: client_update(
            owner.workload,
            task,
            sc.clients[client],
            client_seed(owner.seed, round_idx, client),
            kind=sc.kind,
            choices=sc.choices,
        )
    )


class Engine:
    """``run(tasks, round_idx)`` -> one `ClientResult` per client, in client order."""

    name = "engine"

    def __init__(
        self, workload_factory: Callable[[], object], scenario: Scenario, seed: int, progress: bool = True, **options
    ) -> None:
        self.workload_factory = workload_factory
        self.scenario = scenario
        self.seed = seed
        self.progress = progress
        self.options = options  # engine-specific settings (cohort_size, ray actors, ...): unknown keys are ignored

    def run(self, tasks: Sequence[ClientTask], round_idx: int) -> list[ClientResult]:
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

    def run(self, tasks: Sequence[ClientTask], round_idx: int) -> list[ClientResult]:
        bar = tqdm(list(enumerate(tasks)), desc=f"round {round_idx} clients", leave=False, disable=not self.progress)
        return [update_client(self, task, c, round_idx) for c, task in bar]


# Engines beyond the sequential one live in their own modules, imported only when asked for (Ray is optional).
ENGINES: dict[str, str] = {
    "sequential": "fedamole.fl.engine:SequentialEngine",
    "cohort": "fedamole.fl.cohort:CohortEngine",
    "ray": "fedamole.fl.ray_engine:RayEngine",
}


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass registered as `name`."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {name!r}")
    module_name, _, attr = ENGINES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"engine {name!r} is not usable here: {exc}") from exc
    return getattr(module, attr)


def make_engine(name: str, workload_factory, scenario: Scenario, seed: int, progress: bool = True, **options) -> Engine:
    """An engine by name (see `ENGINES`); `options` go to the engine's constructor (e.g. cohort_size)."""
    return engine_class(name)(workload_factory, scenario, seed, progress=progress, **options)
