"""Checkpoints: the tree codec, crash-safe files, and kill -9 + resume == an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedamole.simulation.checkpoint import decode_tree, encode_tree, load_checkpoint, save_checkpoint

TIMING_KEYS = {"seconds", "wall_seconds"}


def test_tree_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(5)
    state = {
        "pool": {"a": torch.randn(3, 2), "mask": torch.tensor([True, False])},
        "assign": np.eye(3, dtype=bool),
        "ids": np.arange(4, dtype=np.int32),
        "rng": rng,
        "history": [{"x": np.ones(2)}, 1, 2.5, "s", None, (1, 2)],
        "k": np.int64(7),
    }
    save_checkpoint(tmp_path, 4, state)
    round_idx, back = load_checkpoint(tmp_path)
    assert round_idx == 4
    assert torch.equal(back["pool"]["a"], state["pool"]["a"]) and back["pool"]["mask"].dtype == torch.bool
    assert back["assign"].dtype == bool and np.array_equal(back["assign"], state["assign"])
    assert back["ids"].dtype == np.int32
    assert back["rng"].random() == rng.random()
    assert back["history"][5] == (1, 2) and back["k"] == 7
    with pytest.raises(TypeError, match="cannot store"):
        encode_tree({"f": object()}, "state", {})
    assert decode_tree([1, {"__dict__": {}}], {}) == [1, {}]


def test_only_the_latest_complete_checkpoint_is_kept_and_checked(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "round-2.json", "round-2.safetensors"]
    weights = tmp_path / "round-2.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="SHA-256"):
        load_checkpoint(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_checkpoint(tmp_path)


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedamole.simulation.cli",
        "simulate",
        "--preset",
        "tiny",
        "--rounds",
        "3",
        "--local-steps",
        "6",
        "--seed",
        "7",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _checkpoint_round(folder: Path) -> int:
    try:
        return json.loads((folder / "checkpoint" / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_when(cmd, out: Path, condition, timeout: float = 240.0) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    start = time.monotonic()
    try:
        while proc.poll() is None and not condition(time.monotonic() - start):
            if time.monotonic() - start > timeout:
                raise AssertionError("the run never reached the kill point")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    subprocess.run(_cli(full), check=True, capture_output=True, timeout=300)
    expected = json.loads((full / "summary.json").read_text())
    _, expected_state = load_checkpoint(full / "checkpoint")

    def after_checkpoint(out: Path, delay: float):
        seen: list[float] = []

        def condition(t: float) -> bool:
            if not seen and _checkpoint_round(out) >= 1:
                seen.append(t)
            return bool(seen) and t >= seen[0] + delay

        return condition

    kill_points = {  # before any checkpoint (start over), right after round 1, and in the middle of round 2
        "during-setup": lambda out: lambda t: t > 2.0,
        "after-round-1": lambda out: after_checkpoint(out, 0.0),
        "mid-round-2": lambda out: after_checkpoint(out, 0.4),
    }
    for name, make_condition in kill_points.items():
        out = tmp_path / name
        _kill_when(_cli(out), out, make_condition(out))
        assert not (out / "summary.json").exists() or _checkpoint_round(out) == 3
        # Killed before its first checkpoint, the run may not even have claimed `out`: `--resume` there is refused
        # (nothing to resume), and a plain rerun is what a user does.
        again = () if name == "during-setup" else ("--resume",)
        resumed = subprocess.run(_cli(out, *again), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        got = json.loads((out / "summary.json").read_text())
        assert _strip_timing(got) == _strip_timing(expected), name
        _, state = load_checkpoint(out / "checkpoint")
        for key, value in expected_state["model"].items():
            assert torch.equal(state["model"][key], value), (name, key)
        pools = expected_state["algorithm"]["modules"]
        for module, entry in pools.items():
            for kind, tensor in entry["pool"].items():
                assert torch.equal(state["algorithm"]["modules"][module]["pool"][kind], tensor), (name, kind)


def test_resume_refuses_a_different_configuration(tmp_path):
    from fedamole.simulation.presets import make_config
    from fedamole.simulation.runner import simulate

    cfg = make_config("tiny", {"rounds": 1, "local_steps": 1})
    simulate(cfg, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        simulate(
            make_config("tiny", {"rounds": 2, "local_steps": 1, "lr": 0.5}),
            progress=False,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    with pytest.raises(ValueError, match="checkpoint_dir"):
        simulate(cfg, progress=False, resume=True)
