"""Issue 13, run level: a round with no valid upload keeps the server state and is reported; a run in which no client
ever works stops with the first real error (non-zero exit); upload norms are bounded relative to the round; summaries
are strict JSON written atomically."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedamole.fl.protocol import ClientResult, ClientTask
from fedamole.simulation.checkpoint import load_checkpoint
from fedamole.simulation.presets import make_config
from fedamole.simulation.runner import AllClientsFailed, simulate, write_summary
from fedamole.simulation.validation import UPLOAD_NORM_FLOOR, check_round


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


# -- row 8: no valid upload / nothing ever works -------------------------------------------------------------------
def test_round_without_valid_upload_keeps_the_server_state_and_is_reported(tmp_path):
    base = {"local_steps": 2, "eval_initial": False}
    simulate(make_config("tiny", {**base, "rounds": 1}), progress=False, checkpoint_dir=tmp_path / "one")
    every_client_bad = [{"round": 2, "client": c, "kind": "nan"} for c in range(4)]
    summary = simulate(
        make_config("tiny", {**base, "rounds": 2, "faults": every_client_bad}),
        progress=False,
        checkpoint_dir=tmp_path / "two",
    )
    entry = summary["history"][1]
    assert entry["participants"] == 0 and [r["client"] for r in entry["rejected_uploads"]] == [0, 1, 2, 3]
    assert entry["mean"] is None and entry["train_loss"] is None and summary["final_mean"] is None
    _, one = load_checkpoint(tmp_path / "one")
    _, two = load_checkpoint(tmp_path / "two")
    for module, entry in one["algorithm"]["modules"].items():
        assert (entry["assign"] == two["algorithm"]["modules"][module]["assign"]).all()
        for kind, tensor in entry["pool"].items():
            assert torch.equal(tensor, two["algorithm"]["modules"][module]["pool"][kind]), (module, kind)
    written = _strict_json(write_summary(summary, tmp_path / "out"))
    assert written["final_mean"] is None and written["history"][1]["mean"] is None


@pytest.mark.parametrize("eval_initial", [True, False])
def test_every_client_failing_stops_the_run_with_the_first_real_error(monkeypatch, tmp_path, eval_initial):
    monkeypatch.setenv("FEDAMOLE_BACKEND", "bogus")
    cfg = make_config("tiny", {"rounds": 2, "local_steps": 1, "eval_initial": eval_initial})
    with pytest.raises(AllClientsFailed, match=r"client 0\): ValueError: \$FEDAMOLE_BACKEND must be one of"):
        simulate(cfg, progress=False, checkpoint_dir=tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck") is None  # no round completed, none recorded


def test_cli_exits_non_zero_when_every_client_fails(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("eval_initial: false\nrounds: 1\nlocal_steps: 1\n")
    env = {**os.environ, "FEDAMOLE_BACKEND": "bogus"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedamole.simulation.cli",
            "simulate",
            "--preset",
            "tiny",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    assert "fedamole: error: every client failed" in done.stderr and "Traceback" not in done.stderr
    assert "FEDAMOLE_BACKEND must be one of" in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_failing_round_after_a_working_one_is_ridden_out(tmp_path):
    crash_all = [{"round": 2, "client": c, "kind": "crash"} for c in range(4)]
    summary = simulate(
        make_config("tiny", {"rounds": 2, "local_steps": 2, "eval_initial": False, "faults": crash_all}), progress=False
    )
    entry = summary["history"][1]
    assert entry["participants"] == 0 and len(entry["failed_clients"]) == 4
    assert summary["history"][0]["participants"] == 4


# -- row 9: strict JSON, atomic writes ------------------------------------------------------------------------------
def _summary(mean):
    return {
        "algorithm": "fedamole",
        "metric": "accuracy",
        "clients": 2,
        "scenario": "s",
        "final_mean": mean,
        "history": [{"round": 1, "mean": mean, "per_client": [mean, np.float32(0.5)]}],
        "per_seed": np.array([math.inf, 1.0]),
    }


def test_summary_is_strict_json_with_null_for_missing_values(tmp_path):
    data = _strict_json(write_summary(_summary(math.nan), tmp_path))
    assert data["final_mean"] is None and data["history"][0]["per_client"] == [None, 0.5]
    assert data["per_seed"] == [None, 1.0]
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_summary_write_is_atomic(tmp_path, monkeypatch):
    path = write_summary(_summary(0.25), tmp_path)
    before = path.read_bytes()
    real = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_summary(_summary(0.75), tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png", "per_client.csv", "summary.json"]


# -- row 13: upload norms bounded relative to the round -------------------------------------------------------------
def _round(scales, key="m.lora_b", templated=True):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 4, generator=gen)
    payloads = [ClientTask(down={key: base} if templated else {}) for _ in scales]
    uploads = [ClientResult(up={key: base + s * 1e-3 * torch.randn(3, 5, 4, generator=gen)}) for s in scales]
    return uploads, payloads


def test_round_bound_rejects_an_inflated_update_and_keeps_honest_spread():
    uploads, payloads = _round([1.0, 1.5, 0.7, 1e6])
    problems = check_round(uploads, payloads, 10.0)
    assert list(problems) == [3] and "upload_norm_ratio" in problems[3][0]
    assert check_round(*_round([1.0, 3.0, 0.5, 2.0]), 10.0) == {}
    assert check_round(uploads, payloads, None) == {}


def test_round_bound_with_two_clients_trusts_the_smaller_update():
    uploads, payloads = _round([1.0, 1e6])
    assert list(check_round(uploads, payloads, 10.0)) == [1]


def test_round_bound_ignores_unchanged_tensors_and_dropped_clients():
    uploads, payloads = _round([0.0, 0.0, 1.0, 2.0])
    uploads.append(None)
    payloads.append(ClientTask())
    assert check_round(uploads, payloads, 10.0) == {}
    tiny, payloads = _round([UPLOAD_NORM_FLOOR / 1e4, UPLOAD_NORM_FLOOR / 1e4, UPLOAD_NORM_FLOOR * 5])
    assert check_round(tiny, payloads, 10.0) == {}, "changes under the floor never make an outlier"


def test_round_shape_agreement_for_tensors_without_a_template():
    uploads, payloads = _round([1.0, 1.0, 1.0], templated=False)
    uploads[2].up["m.lora_b"] = torch.zeros(2, 5, 4)
    assert list(check_round(uploads, payloads, None)) == [2]
