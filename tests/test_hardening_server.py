"""Issue 13, server side: no NaN leaks from one client to the next, every upload field is schema-checked (a bad one
is rejected and reported, never raised), upload norms are bounded relative to the round, runs where no client ever
works stop with the real error, and summaries are strict JSON written atomically."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import fedamole
from fedamole.fl.client import client_update, load_state
from fedamole.simulation.presets import build_data, build_workload, make_algorithm, make_config, mole_config
from fedamole.simulation.runner import simulate
from fedamole.simulation.validation import check_upload


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**over):
    over = {"rounds": 1, "local_steps": 2, "eval_initial": False, **over}
    return make_config("tiny", over)


# -- row 2: slots a client does not hold are zeroed when its state is loaded --------------------------------------
@pytest.mark.parametrize("router", ["embedding", "linear"])
def test_load_state_zeroes_slots_the_client_does_not_hold(router):
    model = nn.Sequential(nn.Linear(6, 5))
    fedamole.inject_mole(
        model, fedamole.MoLEConfig(num_experts=4, rank=2, top_k=2, router=router, target_modules=["0"])
    )
    module = next(iter(fedamole.mole_modules(model).values()))
    rows = 4 if router == "linear" else 2

    def state(k, fill):
        out = {"0.lora_a": torch.full((k, 2, 6), fill), "0.lora_b": torch.full((k, 5, 2), fill)}
        out["0.router"] = torch.full((k, 6) if router == "linear" else (rows, 6), fill)
        return out

    load_state(model, state(4, math.nan))  # a diverged client holding every slot
    load_state(model, state(2, 1.0))
    assert module.active_experts.tolist() == [True, True, False, False]
    slot_kinds = ("lora_a", "lora_b", "router") if router == "linear" else ("lora_a", "lora_b")
    for kind in slot_kinds:
        values = getattr(module, kind)
        assert (values[:2] == 1).all(), kind
        assert (values[2:] == 0).all(), kind
    x = torch.randn(3, 6)
    assert torch.isfinite(model(x)).all()


def test_one_diverging_client_does_not_poison_the_others():
    """Issue reproducer: 6 experts over 4 clients holding 2..4 each; client 0 diverges (its trained tensors become
    NaN) and trains first, so the next clients load their states into slots it left NaN."""
    cfg = _tiny(fedamole={"num_experts": 6}, faults=[{"round": 1, "client": 0, "kind": "diverge"}])
    entry = simulate(cfg, progress=False)["history"][0]
    assert [r["client"] for r in entry["rejected_uploads"]] == [0]
    assert any("NaN" in reason for reason in entry["rejected_uploads"][0]["reasons"])
    assert entry["participants"] == 3


# -- row 3 / row 13: every upload field is schema-checked ---------------------------------------------------------
@pytest.fixture(scope="module")
def honest():
    """One honest FedAMoLE upload (with statistics) and the payload it answers, per router kind."""
    out = {}
    for router in ("embedding", "linear"):
        cfg = make_config("tiny", {"algorithm": "fedamole" if router == "embedding" else "fedamole-linear"})
        scenario = build_data(cfg)
        algo = make_algorithm(cfg)
        workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
        algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
        payload = dataclasses.replace(algo.payloads(1)[0], steps=1, lr=1e-3, batch_size=2)
        upload = client_update(workload, payload, scenario.clients[0], seed=3, choices=scenario.choices)
        assert check_upload(upload, payload, 1e6) == []
        out[router] = upload, payload
    return out


def _module(upload):
    return sorted(upload.stats.t)[0]


def _drop_e_module(u):
    del u.stats.e[_module(u)]
    return u


def _replaced(obj, keys, value):
    """A copy of `obj` with ``obj.keys[0][keys[1]]... = value``: a dataclass field is replaced, a dict item set, any
    other attribute (one the class does not have) added, as a client could send it."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(obj, dict):
        return {**obj, head: _replaced(obj.get(head), rest, value)}
    if head in {f.name for f in dataclasses.fields(obj)}:
        return dataclasses.replace(obj, **{head: _replaced(getattr(obj, head), rest, value)})
    out = copy.copy(obj)
    object.__setattr__(out, head, value)
    return out


def _set(path, value):
    """A change of an upload: ``path`` (attribute, then keys; a callable computes a key from the upload) -> value."""

    def change(u):
        keys = [key(u) if callable(key) else key for key in path]
        return _replaced(u, keys, value(u) if callable(value) else value)

    return change


def _without(name):
    """A change that removes field `name` from the upload (a result unpickled from a client may lack it)."""

    def change(u):
        object.__delattr__(u, name)
        return u

    return change


MALFORMED = {
    "t too long": (_set(["stats", "t", _module], lambda u: torch.zeros(9)), "stats.t"),
    "t wrong rank": (_set(["stats", "t", _module], lambda u: torch.zeros(4, 1)), "stats.t"),
    "t an int tensor": (_set(["stats", "t", _module], lambda u: torch.zeros(4, dtype=torch.int64)), "stats.t"),
    "t a list": (_set(["stats", "t", _module], [0.0] * 4), "not a tensor"),
    "e missing a module": (_drop_e_module, "stats.e"),
    "e wrong rank": (_set(["stats", "e", _module], lambda u: torch.zeros(u.stats.e[_module(u)].numel())), "e"),
    "e extra row": (_set(["stats", "e", _module], lambda u: torch.zeros(9, 4)), "stats.e"),
    "stats not asked for shape": (_set(["stats"], {"t": {}, "e": {}, "x": {}}), "stats"),
    "train_loss missing": (_without("train_loss"), "train_loss"),
    "train_loss a string": (_set(["train_loss"], "0.3"), "train_loss"),
    "train_loss inf": (_set(["train_loss"], math.inf), "train_loss"),
    "metric missing": (_without("metric"), "metric"),
    "metric inf": (_set(["metric"], math.inf), "metric"),
    "metric 1e300": (_set(["metric"], 1e300), "metric"),
    "metric True": (_set(["metric"], True), "metric"),
    "metric a string": (_set(["metric"], "0.9"), "metric"),
    "metric a tensor": (_set(["metric"], torch.tensor(0.5)), "metric"),
    "num_train negative": (_set(["num_train"], -1), "num_train"),
    "num_train a float": (_set(["num_train"], 2.5), "num_train"),
    "fusion_weights NaN": (_set(["fusion_weights"], [0.5, math.nan]), "fusion_weights"),
    "fusion_weights a string": (_set(["fusion_weights"], "0.5"), "fusion_weights"),
    "private with a tensor not kept": (_set(["private"], {"x.lora_a": torch.zeros(1)}), "private"),
    "private not a dict": (_set(["private"], [1, 2]), "private"),
    "unknown field": (_set(["extra"], 1), "unexpected field"),
    "ragged expert ids": (_set(["expert_ids", _module], [[0, 1], [2]]), "expert_ids"),
    "float expert ids": (_set(["expert_ids", _module], lambda u: u.expert_ids[_module(u)].astype(float)), "ints"),
    "sparse tensor": (
        _set(["up", lambda u: sorted(u.up)[0]], lambda u: u.up[sorted(u.up)[0]].to_sparse()),
        "dense",
    ),
    "meta tensor": (
        _set(["up", lambda u: sorted(u.up)[0]], lambda u: u.up[sorted(u.up)[0]].to("meta")),
        "dense",
    ),
    "failed but screened": (lambda u: dataclasses.replace(u, status="failed", error="boom"), "status 'failed'"),
    "not a ClientResult": (lambda u: {f.name: getattr(u, f.name) for f in dataclasses.fields(u)}, "not a ClientResult"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_upload_fields_are_rejected_not_raised(honest, name):
    change, needle = MALFORMED[name]
    upload, payload = honest["embedding"]
    bad = change(copy.deepcopy(upload))
    problems = check_upload(bad, payload, 1e6)
    assert problems and any(needle in p for p in problems), problems


def test_linear_router_statistics_have_d_in_tokens_and_no_e(honest):
    upload, payload = honest["linear"]
    module = _module(upload)
    assert upload.stats.e == {}
    bad = copy.deepcopy(upload)
    bad.stats.t[module] = bad.stats.t[module][:4]
    assert any("stats.t" in p for p in check_upload(bad, payload, 1e6))
    bad = copy.deepcopy(upload)
    bad.stats.e[module] = torch.zeros(2, 4)
    assert any("stats.e" in p for p in check_upload(bad, payload, 1e6))


@pytest.mark.parametrize("metric", [0.0, 1.0, 0.5, np.float32(0.25), math.nan])
def test_valid_metrics_are_accepted(honest, metric):
    upload, payload = honest["embedding"]
    assert check_upload(dataclasses.replace(upload, metric=metric), payload, 1e6) == []
