"""Malformed uploads are rejected, failing clients are skipped, and the server ends exactly where it would have
ended had those clients simply dropped out."""

import pytest
import torch

from fedamole.simulation.checkpoint import load_checkpoint
from fedamole.simulation.presets import make_config
from fedamole.simulation.runner import simulate
from fedamole.simulation.validation import UPLOAD_FAULTS


def _run(tmp_path, name, algorithm="fedamole", faults=()):
    cfg = make_config(
        "tiny",
        {
            "algorithm": algorithm,
            "rounds": 1,
            "local_steps": 2,
            "eval_initial": False,
            "faults": [{"round": 1, "client": 1, "kind": k} for k in faults],
        },
    )
    summary = simulate(cfg, progress=False, checkpoint_dir=tmp_path / name)
    _, state = load_checkpoint(tmp_path / name)
    return summary, state["algorithm"]


def _assert_same_server(a, b):
    if "modules" in a:
        for module, entry in a["modules"].items():
            assert (entry["assign"] == b["modules"][module]["assign"]).all(), module
            for kind, tensor in entry["pool"].items():
                assert torch.equal(tensor, b["modules"][module]["pool"][kind]), (module, kind)
        for key, tensor in a["extra"].items():
            assert torch.equal(tensor, b["extra"][key]), key
    else:
        for key, tensor in a["glob"].items():
            assert torch.equal(tensor, b["glob"][key]), key


@pytest.fixture(scope="module")
def dropped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropped")
    return {algo: _run(tmp, algo, algo, faults=["dropout"]) for algo in ("fedamole", "fedit")}


def test_dropout_is_reported_and_changes_the_server(tmp_path, dropped):
    summary, server = dropped["fedamole"]
    entry = summary["history"][0]
    assert entry["dropped_clients"] == [1] and entry["participants"] == 3
    assert summary["final_per_client"][1] is None
    _, clean = _run(tmp_path, "clean")
    changed = any(
        not torch.equal(t, clean["modules"][m]["pool"][k])
        for m, e in server["modules"].items()
        for k, t in e["pool"].items()
    )
    assert changed, "a dropped client must make a difference, or the identity tests below test nothing"


@pytest.mark.parametrize("kind", UPLOAD_FAULTS)
def test_bad_upload_is_rejected_and_leaves_no_trace(tmp_path, dropped, kind):
    summary, server = _run(tmp_path, kind, faults=[kind])
    entry = summary["history"][0]
    assert [r["client"] for r in entry["rejected_uploads"]] == [1], entry["rejected_uploads"]
    assert entry["rejected_uploads"][0]["reasons"]
    assert entry["participants"] == 3
    _assert_same_server(server, dropped["fedamole"][1])


def test_crashing_client_is_skipped(tmp_path, dropped):
    summary, server = _run(tmp_path, "crash", faults=["crash"])
    entry = summary["history"][0]
    assert entry["failed_clients"][0]["client"] == 1
    assert "injected crash" in entry["failed_clients"][0]["error"]
    _assert_same_server(server, dropped["fedamole"][1])


@pytest.mark.parametrize("kind", ["nan", "shape", "huge_norm", "extra_key"])
def test_baseline_rejects_bad_uploads(tmp_path, dropped, kind):
    summary, server = _run(tmp_path, f"fedit-{kind}", "fedit", faults=[kind])
    assert [r["client"] for r in summary["history"][0]["rejected_uploads"]] == [1]
    _assert_same_server(server, dropped["fedit"][1])


@pytest.mark.parametrize(
    "faults,needle",
    [
        ([{"round": 1, "client": 9, "kind": "nan"}], "client"),
        ([{"round": 0, "client": 1, "kind": "nan"}], "round"),
        ([{"round": 1, "client": 1, "kind": "meteor"}], "kind"),
        ([{"round": 1, "client": 1}], "keys"),
        ("crash", "list"),
        ([{"round": 1, "client": 1, "kind": "nan"}, {"round": 1, "client": 1, "kind": "crash"}], "repeats round 1"),
    ],
)
def test_fault_config_is_validated(faults, needle):
    with pytest.raises(ValueError, match=needle):
        make_config("tiny", {"faults": faults}).validate()
