"""`--engine ray`: a local Ray cluster (2 CPUs, fractional-CPU actors) gives the same results as the sequential engine,
and a Ray actor that dies (a real process exit mid-round, a real ``ray.kill`` between rounds) is replaced.

Skipped when Ray is not installed (``pip install 'fedamole[ray]'``), except the checks that need no cluster.
"""

import os
import sys

import numpy as np
import pytest
import torch

import fedamole.simulation.runner as runner
from fedamole.fl.engine import make_engine
from fedamole.fl.ray_engine import RayEngine, chunk_bounds
from fedamole.simulation.presets import build_data, make_algorithm, make_config

# Offline and light: no usage report, no dashboard; a local cluster only.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

TINY = {"algorithm": "fedamole", "clients": 4, "rounds": 2, "local_steps": 2}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module: starting Ray costs seconds, so tests share it (the engine must then leave
    it running)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # started by someone else: use it, leave it
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_chunk_bounds_are_contiguous_and_balanced():
    assert chunk_bounds(4, 2) == [(0, 2), (2, 4)]
    assert chunk_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(2, 8) == [(0, 1), (1, 2)]  # never an empty chunk
    assert chunk_bounds(1, 1) == [(0, 1)]


def _engine(cfg, ray_opts):
    scenario = build_data(cfg)
    return make_engine(
        "ray",
        lambda: None,
        scenario,
        cfg.seed,
        progress=False,
        **{**runner.engine_options(cfg, runner.mole_config(cfg)), "ray": ray_opts},
    )


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"num_actors": 0}, "num_actors"),
        ({"cpus_per_actor": 0}, "cpus_per_actor"),
        ({"kill_actor_after_round": -1}, "kill_actor_after_round"),
        ({"threads": 0}, "threads"),
        ({"rebuild_data": "yes"}, "rebuild_data"),
        ({"num_actor": 2}, "unknown options"),
        ({"address": 6379}, "address"),
    ],
)
def test_bad_options_are_rejected_before_starting_anything(opts, match):
    pytest.importorskip("ray")
    with pytest.raises(ValueError, match=match):
        _engine(make_config("tiny", TINY), opts)


def test_every_ray_option_can_be_configured():
    """The configuration's ``ray`` section takes exactly the engine's options (no Ray needed)."""
    from fedamole.fl.ray_engine import RAY_OPTIONS
    from fedamole.simulation.config_checks import SECTIONS

    assert set(SECTIONS["ray"]) == set(RAY_OPTIONS)
    make_config("tiny", {**TINY, "engine": "ray", "ray": {"cohort": False}}).validate()
    with pytest.raises(ValueError, match="cohort"):
        make_config("tiny", {**TINY, "engine": "ray", "ray": {"cohort": "no"}}).validate()


def test_missing_builders_are_a_clear_error():
    pytest.importorskip("ray")
    cfg = make_config("tiny", TINY)
    with pytest.raises(ValueError, match="build_workload"):
        make_engine("ray", lambda: None, build_data(cfg), cfg.seed, progress=False, ray={})
    options = runner.engine_options(cfg, runner.mole_config(cfg))
    del options["build_data"]
    with pytest.raises(ValueError, match="rebuild_data needs the engine option build_data"):
        make_engine(
            "ray", lambda: None, build_data(cfg), cfg.seed, progress=False, **{**options, "ray": {"rebuild_data": True}}
        )


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when not installed
    with pytest.raises(ImportError, match=r"fedamole\[ray\]"):
        _engine(make_config("tiny", TINY), {})


def _nan(values):
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _run(cfg, monkeypatch, faults=None):
    """simulate(cfg), also returning the algorithm (its server state) and the engine the runner built; ``faults``
    (the engine's test-only fault-injection options) are added to the ray options the runner passes."""
    seen = {}

    def algorithm(c):
        seen["algo"] = make_algorithm(c)
        return seen["algo"]

    def engine(*args, **kwargs):
        if faults:
            kwargs["ray"] = {**kwargs["ray"], **faults}
        seen["engine"] = make_engine(*args, **kwargs)
        return seen["engine"]

    monkeypatch.setattr(runner, "make_algorithm", algorithm)
    monkeypatch.setattr(runner, "make_engine", engine)
    summary = runner.simulate(cfg, progress=False)
    return summary, seen["algo"], seen["engine"]


def _assert_same_run(par, par_algo, seq, seq_algo):
    """Same metrics, round reports, traffic, assignments and server state (fp32 tolerance)."""
    np.testing.assert_allclose(par["initial_per_client"], seq["initial_per_client"], atol=1e-4)
    for a, b in zip(par["history"], seq["history"], strict=True):
        np.testing.assert_allclose(_nan(a["per_client"]), _nan(b["per_client"]), atol=1e-4)  # None: no metric
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
        for key in ("participants", "failed_clients", "dropped_clients", "rejected_uploads"):
            assert a.get(key) == b.get(key), key
    for name, mod in seq_algo.modules.items():
        other = par_algo.modules[name]
        np.testing.assert_array_equal(other["assign"], mod["assign"])
        for kind, t in mod["pool"].items():
            torch.testing.assert_close(other["pool"][kind], t, rtol=1e-4, atol=1e-5, msg=f"{name}.{kind}")
    for k, t in seq_algo.extra.items():
        torch.testing.assert_close(par_algo.extra[k], t, rtol=1e-4, atol=1e-5)


def test_ray_equals_sequential_and_replaces_a_crashed_actor(ray_cluster, monkeypatch):
    """FedAMoLE on `tiny`, 4 clients over 2 actors, 2 rounds. Actor 0's process exits in the middle of its chunk in
    round 1 (a real crash: the chunk is rerun on a freshly started actor). The results must not notice."""
    # Client-level faults too (handled inside the actor exactly as in-process): the round reports must agree.
    client_faults = [{"round": 1, "client": 3, "kind": "crash"}, {"round": 2, "client": 0, "kind": "dropout"}]
    seq, seq_algo, _ = _run(make_config("tiny", {**TINY, "faults": client_faults}), monkeypatch)
    cfg = make_config(
        "tiny", {**TINY, "faults": client_faults, "engine": "ray", "ray": {"num_actors": 2, "cpus_per_actor": 0.5}}
    )
    par, par_algo, engine = _run(cfg, monkeypatch, faults={"crash_actor_in_round": 1})

    assert isinstance(engine, RayEngine)
    assert engine.replacements == 1
    assert ray_cluster.is_initialized()  # the engine did not start this cluster, so it must not stop it
    assert par["engine"] == "ray"

    assert seq["history"][0]["failed_clients"][0]["client"] == 3  # the injected client faults did happen
    assert seq["history"][1]["dropped_clients"] == [0]
    _assert_same_run(par, par_algo, seq, seq_algo)


@pytest.mark.slow  # another actor build (~8 s on 2 cores) on top of the test above
def test_actor_killed_between_rounds_is_replaced(ray_cluster, monkeypatch):
    """FedIT on `tiny`: ``ray.kill`` of actor 0 after round 1; round 2 finds it dead, replaces it and reruns its
    chunk. Same results as sequential."""
    cfg = {**TINY, "algorithm": "fedit"}
    seq, seq_algo, _ = _run(make_config("tiny", cfg), monkeypatch)
    par, par_algo, engine = _run(
        make_config("tiny", {**cfg, "engine": "ray"}), monkeypatch, faults={"kill_actor_after_round": 1}
    )
    assert engine.replacements == 1
    np.testing.assert_allclose(par["initial_per_client"], seq["initial_per_client"], atol=1e-4)
    for a, b in zip(par["history"], seq["history"], strict=True):
        np.testing.assert_allclose(_nan(a["per_client"]), _nan(b["per_client"]), atol=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    for k, t in seq_algo.glob.items():
        torch.testing.assert_close(par_algo.glob[k], t, rtol=1e-4, atol=1e-5, msg=k)


def test_engine_started_ray_is_shut_down_on_close(monkeypatch):
    """An engine that had to start Ray (local, no dashboard) stops it in close(). Only this
    bookkeeping is faked; the cluster test below checks that a cluster found running is left running."""
    ray = pytest.importorskip("ray")
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", {})))
    monkeypatch.setattr(ray, "put", lambda obj: obj)
    monkeypatch.setattr(ray, "get", lambda refs: refs)
    monkeypatch.setattr(RayEngine, "_new_actor", lambda self: _NoActor())
    engine = _engine(make_config("tiny", TINY), {"num_actors": 1})
    engine._start()
    assert calls[0][0] == "init" and calls[0][1]["num_cpus"] >= 1 and calls[0][1]["include_dashboard"] is False
    engine.close()
    assert [c[0] for c in calls] == ["init", "shutdown"]


class _NoActor:
    """Stands in for an actor handle where only the start/stop bookkeeping is under test."""

    class _Method:
        def remote(self, *args):
            return 0

    ready = _Method()


def test_actor_runs_its_share_as_cohorts_with_the_sequential_results():
    """The body of a Ray actor (no cluster needed): its chunk of clients 1..3 runs as a cohort, with global client
    ids (seeds), and gives what the sequential engine gives those clients."""
    import functools

    from fedamole.fl.ray_engine import ClientActor
    from fedamole.simulation.presets import build_workload, mole_config

    cfg = make_config("tiny", {**TINY, "clients": 5})
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    model_config = algo.mole_config(mole_config(cfg))
    actor = ClientActor(
        functools.partial(build_workload, cfg, model_config),
        functools.partial(build_data, cfg),
        scenario,
        cfg.seed,
        threads=1,
        cohort_options={"cohort_size": 0},
    )
    algo.setup(actor.workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    tasks = [t.with_settings(steps=2, lr=1e-3, batch_size=4, max_grad_norm=1.0) for t in algo.payloads(1)]
    out = actor.run_chunk(tasks[1:4], 1, 1)
    assert actor.cohorts.report["cohort_clients"] == 3 and actor.cohorts.report["fallbacks"] == []
    seq = make_engine("sequential", lambda: actor.workload, scenario, cfg.seed, progress=False).run(tasks, 1)
    for a, b in zip(seq[1:4], out):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-4)
        for key, t in a.up.items():
            torch.testing.assert_close(b.up[key], t, atol=2e-5, rtol=1e-4)
