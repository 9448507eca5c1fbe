"""The benchmark scripts run end to end at a tiny shape on CPU (the figures themselves live in benchmarks/results/)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_mole_smoke(tmp_path):
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mole.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = list(tmp_path.rglob("*.csv"))
    assert written, f"no CSV written: {result.stdout[-2000:]}"
    assert len(written[0].read_text().splitlines()) > 1


def test_bench_simulation_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_simulation.py"), "--clients", "4",
                             "--rounds", "1", "--probe", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.rglob("*.json")), f"no results written: {result.stdout[-2000:]}"
