"""`--engine ray`: a pool of Ray actors, each holding one model, runs a round's clients in contiguous chunks.

Each actor builds its workload once, by calling the engine option ``build_workload(scenario)`` (a picklable callable
the caller passes in: the simulation gives `fedamole.simulation.builders.build_workload` bound to its config and the
algorithm's `MoLEConfig`; it is seeded, so every actor starts from the same backbone as the driver), on the scenario
(shipped once through the object store, or rebuilt by the option ``build_data()`` with ``rebuild_data``). Per round
the driver puts each chunk's tasks into the object store once, every actor runs its clients as cohorts
(`CohortEngine.run_clients`: one backbone, one forward per step for its whole share) or, with ``cohort=False``, one
at a time as `SequentialEngine` does (same per-client seeds either way), and the driver reassembles the results in
client order. Aggregation and assignment stay on the driver, so results equal ``--engine sequential`` up to
floating-point tolerance (dropout 0).

A chunk whose actor dies (`ray.exceptions.RayActorError`: process crash, OOM kill, ``ray.kill``) is rerun once on a
freshly started replacement actor; a second failure of the same chunk in the same round is an error.

Options (``SimConfig.ray``): ``num_actors`` (2), ``cpus_per_actor`` (0.5: fractional, because whole-CPU actors can
take every CPU of a small machine and starve other tasks), ``gpus_per_actor`` (0), ``address`` (an existing cluster;
None = start a local one), ``num_cpus`` (CPUs of a locally started cluster; default: all), ``threads`` (torch threads
per actor; default: the engine option ``threads``, else ``cpus_per_actor`` rounded down and at least 1, so that actors
do not oversubscribe the cores), ``rebuild_data`` (False), ``cohort`` (True: each actor runs its share of a round as
cohorts, `fedamole.fl.cohort.CohortEngine`, with the run's cohort_size / max_memory (split between the actors) /
cohort_tokens; False: one client at a time).
Fault injection for tests: ``kill_actor_after_round`` (``ray.kill`` actor 0 once after that round) and
``crash_actor_in_round`` (actor 0's process exits in the middle of its chunk in that round, once).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from fedamole.fl.engine import Engine, update_client
from fedamole.fl.protocol import ClientResult, ClientTask

__all__ = ["RayEngine", "ClientActor", "RAY_OPTIONS"]

log = logging.getLogger(__name__)

RAY_OPTIONS = {
    "num_actors": 2,
    "cpus_per_actor": 0.5,
    "gpus_per_actor": 0,
    "address": None,
    "num_cpus": None,
    "threads": None,
    "rebuild_data": False,
    "cohort": True,
    "kill_actor_after_round": None,
    "crash_actor_in_round": None,
}


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("engine 'ray' needs Ray: pip install 'fedamole[ray]' (or pip install 'ray>=2.9')") from exc
    return ray


def _check_options(opts: dict) -> dict:
    unknown = sorted(set(opts) - set(RAY_OPTIONS))
    if unknown:
        raise ValueError(f"ray: unknown options {unknown}; allowed: {sorted(RAY_OPTIONS)}")
    out = {**RAY_OPTIONS, **opts}
    n = out["num_actors"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ray.num_actors must be an integer >= 1, got {n!r}")
    for name, low in (("cpus_per_actor", 0.0), ("gpus_per_actor", None)):
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v == low:
            # Zero-CPU actors would all be scheduled at once however few cores there are.
            raise ValueError(f"ray.{name} must be a finite number {'> 0' if low is not None else '>= 0'}, got {v!r}")
    for name, low in (("num_cpus", 1), ("threads", 1), ("kill_actor_after_round", 0), ("crash_actor_in_round", 0)):
        v = out[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"ray.{name} must be None or an integer >= {low}, got {v!r}")
    for name in ("rebuild_data", "cohort"):
        if not isinstance(out[name], bool):
            raise ValueError(f"ray.{name} must be true or false, got {out[name]!r}")
    if out["address"] is not None and not isinstance(out["address"], str):
        raise ValueError(f"ray.address must be None or a string such as 'auto' or 'host:port', got {out['address']!r}")
    return out


def chunk_bounds(num_clients: int, num_chunks: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) client ranges, sizes differing by at most one, no empty range."""
    num_chunks = max(1, min(num_chunks, num_clients))
    base, extra = divmod(num_clients, num_chunks)
    out, lo = [], 0
    for i in range(num_chunks):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


class ClientActor:
    """The body of one Ray actor (wrapped by ``ray.remote`` in `RayEngine`): one workload, many clients."""

    def __init__(
        self, build_workload, build_data, scenario, seed: int, threads: int, cohort_options: dict | None = None
    ) -> None:
        import torch

        # One intra-op thread per fractional-CPU actor: several actors each using every core would oversubscribe the
        # machine. (Matmul results may then differ from a multi-threaded driver at the ~1e-6 level.)
        torch.set_num_threads(max(1, int(threads)))
        self.scenario = scenario if scenario is not None else build_data()
        self.workload = build_workload(self.scenario)
        self.seed = seed
        self.cohorts = None
        if cohort_options is not None:
            from fedamole.fl.cohort import CohortEngine

            self.cohorts = CohortEngine(lambda: self.workload, self.scenario, seed, progress=False, **cohort_options)

    def ready(self) -> int:
        """The actor's process id, once the workload is built (lets the driver surface build errors early)."""
        return os.getpid()

    def run_chunk(
        self, tasks: Sequence[ClientTask], start: int, round_idx: int, crash: bool = False
    ) -> list[ClientResult]:
        """Clients ``start .. start + len(tasks) - 1`` of a round: as cohorts (`CohortEngine`) when the actor has
        cohort options, else one at a time exactly as `SequentialEngine` runs them."""
        if self.cohorts is not None and not crash:
            return self.cohorts.run_clients(tasks, range(start, start + len(tasks)), round_idx)
        out = []
        for i, task in enumerate(tasks):
            if crash and i == len(tasks) // 2:
                os._exit(1)  # injected fault: the process dies mid-chunk, as on a segfault or an OOM kill
            # A client's own exception is contained exactly as SequentialEngine does (a failed result), so
            # the round report does not depend on the engine; only the actor's death is handled by the driver.
            out.append(update_client(self, task, start + i, round_idx))
        return out


class RayEngine(Engine):
    """Clients of a round split into contiguous chunks over a pool of Ray actors; see the module docstring."""

    name = "ray"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ray = _import_ray()
        self.ray_options = _check_options(dict(self.options.get("ray") or {}))
        # How an actor builds its model (and, with rebuild_data, its data): picklable callables from the caller.
        self.build_workload = self.options.get("build_workload")
        self.build_data = self.options.get("build_data")
        if not callable(self.build_workload):
            raise ValueError(
                "engine 'ray' needs the option build_workload (a picklable callable: scenario -> workload): "
                "actors rebuild the model with it"
            )
        if self.ray_options["rebuild_data"] and not callable(self.build_data):
            raise ValueError("ray.rebuild_data needs the engine option build_data (a picklable callable -> scenario)")
        self.replacements = 0  # actors replaced after a failure (for reports and tests)
        self._actors: list = []
        self._actor_cls = None
        self._scenario_ref = None
        self._started_ray = False
        self._killed = False
        self._crashed = False

    # -- pool -----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._actors:
            return
        ray, o = self._ray, self.ray_options
        if not ray.is_initialized():
            # No usage reporting and no dashboard: simulations run offline and the dashboard costs a process.
            os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
            kwargs = {"include_dashboard": False, "log_to_driver": True}
            if o["address"]:
                ray.init(address=o["address"], **kwargs)
            else:
                ray.init(num_cpus=o["num_cpus"] or os.cpu_count() or 2, **kwargs)
            self._started_ray = True
        if o["gpus_per_actor"] == 0 and self.options.get("device", "cpu") != "cpu":
            import torch

            if torch.cuda.is_available():  # Ray hides GPUs from actors that did not ask for one
                log.warning("engine 'ray': gpus_per_actor is 0, so actors run on CPU although this machine has a GPU")
        threads = o["threads"] or self.options.get("threads") or max(1, int(o["cpus_per_actor"]))
        self._threads = int(threads)
        self._actor_cls = ray.remote(num_cpus=o["cpus_per_actor"], num_gpus=o["gpus_per_actor"], max_restarts=0)(
            ClientActor
        )
        if not o["rebuild_data"]:
            self._scenario_ref = ray.put(self.scenario)  # once: every actor (and replacement) reads the same copy
        self._actors = [self._new_actor() for _ in range(o["num_actors"])]
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise RuntimeError(f"engine 'ray': an actor could not build the workload: {exc}") from exc

    def _new_actor(self):
        cohort = None
        if self.ray_options["cohort"]:
            cohort = {k: self.options.get(k) for k in ("cohort_size", "max_memory", "cohort_tokens")}
            if cohort["max_memory"] is not None:  # the budget is the machine's: each actor gets its share
                cohort["max_memory"] = cohort["max_memory"] / self.ray_options["num_actors"]
        return self._actor_cls.remote(
            self.build_workload, self.build_data, self._scenario_ref, self.seed, self._threads, cohort
        )

    def _replace(self, i: int, exc: BaseException) -> None:
        ray = self._ray
        log.warning("engine 'ray': actor %d failed (%s); starting a replacement", i, type(exc).__name__)
        try:
            ray.kill(self._actors[i], no_restart=True)  # it may only be unreachable: make sure it is gone
        except Exception:  # already dead is the usual case
            pass
        self._actors[i] = self._new_actor()
        self.replacements += 1

    # -- rounds ---------------------------------------------------------------------------------------------
    def run(self, tasks: Sequence[ClientTask], round_idx: int) -> list[ClientResult]:
        if not tasks:
            return []
        self._start()
        ray, o = self._ray, self.ray_options
        chunks = chunk_bounds(len(tasks), len(self._actors))
        pending: dict = {}  # future -> (chunk index, tasks ref, attempt)
        crash_now = o["crash_actor_in_round"] == round_idx and not self._crashed
        for i, (lo, hi) in enumerate(chunks):
            # Each task goes into the object store once per round; a rerun after a failure reuses the ref.
            ref = ray.put(list(tasks[lo:hi]))
            fut = self._actors[i].run_chunk.remote(ref, lo, round_idx, crash_now and i == 0)
            pending[fut] = (i, ref, 0)
        self._crashed = self._crashed or crash_now
        results: list = [None] * len(chunks)
        with tqdm(
            total=len(tasks), desc=f"round {round_idx} clients (ray)", leave=False, disable=not self.progress
        ) as bar:
            while pending:
                (fut,), _ = ray.wait(list(pending), num_returns=1)
                i, ref, attempt = pending.pop(fut)
                try:
                    results[i] = ray.get(fut)
                except ray.exceptions.RayActorError as exc:
                    if attempt >= 1:
                        raise RuntimeError(
                            f"engine 'ray': round {round_idx}, clients {chunks[i][0]}.."
                            f"{chunks[i][1] - 1} failed again on a replacement actor"
                        ) from exc
                    self._replace(i, exc)
                    pending[self._actors[i].run_chunk.remote(ref, chunks[i][0], round_idx, False)] = (i, ref, 1)
                    continue
                bar.update(len(results[i]))
        if o["kill_actor_after_round"] == round_idx and not self._killed:
            self._killed = True
            ray.kill(self._actors[0], no_restart=True)  # injected fault: the next round finds actor 0 dead
        return [u for chunk in results for u in chunk]

    def close(self) -> None:
        """Stop the actors; shut Ray down only if this engine started (or connected) it."""
        ray = self._ray
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # a dead actor needs no killing
                pass
        self._actors = []
        self._scenario_ref = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False
