"""The benchmark scripts run end to end at a tiny shape on CPU (the figures themselves live in benchmarks/results/)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedamole_kernels import available_backends

ROOT = Path(__file__).resolve().parents[1]


def test_bench_mole_smoke(tmp_path):
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mole.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = list(tmp_path.rglob("*.csv"))
    assert written, f"no CSV written: {result.stdout[-2000:]}"
    assert len(written[0].read_text().splitlines()) > 1


def test_bench_simulation_smoke(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_simulation.py"),
            "--clients",
            "4",
            "--rounds",
            "1",
            "--probe",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.rglob("*.json")), f"no results written: {result.stdout[-2000:]}"


def _smoke(script: str, out: Path, timeout: float) -> None:
    """Runs benchmarks/`script` --smoke --out `out`; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_bench_layer_overhead_smoke(tmp_path):
    _smoke("bench_layer_overhead.py", tmp_path, timeout=300)
    (written,) = tmp_path.glob("layer-overhead-*.json")
    data = json.loads(written.read_text())
    providers = {row["provider"] for row in data["rows"]}
    has_cpu = "cpu" in available_backends("cpu")
    assert {"linear", "mole-ref"} | ({"mole"} if has_cpu else set()) <= providers, providers
    assert all(row["us_per_call"] > 0 for row in data["rows"])
    assert {row["mode"] for row in data["python_overhead"]} == {"fwd-nograd", "fwd", "fwd+bwd"}
    assert data["meta"]["load_average_before"] and data["meta"]["torch"] == torch.__version__
    counts = {(c["provider"], c["mode"]): c for c in data["op_counts"]}
    if has_cpu:
        assert counts[("mole", "fwd+bwd")]["sync_ops"] == 0  # the layer path on the cpu backend never syncs
    assert len((tmp_path / written.name.replace(".json", ".csv")).read_text().splitlines()) == len(data["rows"]) + 1


def test_bench_startup_smoke(tmp_path):
    _smoke("bench_startup.py", tmp_path, timeout=600)
    (written,) = tmp_path.glob("startup-*.json")
    cases = {r["case"]: r for r in json.loads(written.read_text())["results"]}
    assert "torch._dynamo" not in cases["import fedamole"]["heavy_modules"]
    assert cases["simulate tiny"]["phases_median"]["first_round"] > 0
