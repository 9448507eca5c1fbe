"""The GPU path on paper (issue 14, item 4): sm_90 resources without spills, the roofline, the GPU suite's CPU-safe
parts. No GPU needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from triton_launches import REFERENCE, Problem, backward_launches, forward_launches  # noqa: E402


def _resources(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """benchmarks/triton_resources.py in a child process (compiled for sm_90 with Triton's own ptxas flags, outside
    the interpreter whatever this session runs), its Triton cache in `out`."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(out / "cache"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "triton_resources.py"), *args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available for ahead-of-time compilation")
    found = list(out.glob("triton-sm90-resources-*.json"))
    return proc, json.loads(found[0].read_text())["rows"] if found else []


def test_triton_kernels_do_not_spill_on_sm90(tmp_path):
    """Every kernel x autotune config left after pruning, at E = 8, r = 16 (S = 10) and E = 6, r = 8 (T = S = 1),
    with dropout, compiled for sm_90 ahead of time as Triton does by default: ptxas must report 0 spill bytes
    (issue 14, 4a). The whole SPEC grid: benchmarks/triton_resources.py (benchmarks/results/triton-sm90-resources-*)."""
    proc, rows = _resources(tmp_path, "--subset")
    assert "SPILL" not in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {r["kernel"] for r in rows} == {"route_shrink_fwd", "route_bwd", "seg_gemm", "seg_wgrad"}
    assert all(0 < r["regs"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0 for r in rows)
    assert all(r["smem"] <= 227 * 1024 for r in rows)


def test_autotune_pruning_leaves_configs_for_every_spec_shape():
    """Every launch of the SPEC grid keeps >= 1 config, and the routing configs fit their accumulators everywhere,
    E = 30 (EP * R = 512) included: there the routing kernels loop over slot groups (`route_group`)."""
    from triton_launches import grid_problems, layer_launches

    from fedamole_kernels import triton_mole_kernels as K

    no_fit = set()
    for p in grid_problems() + grid_problems(dropout=False):
        for launch in layer_launches(p):
            if not launch.kind:
                continue
            assert K.configs_for(launch.kind, launch.constexprs, launch.kernel), (p, launch.name)
            bwd = launch.kernel == "_route_bwd"
            if launch.kind == "route" and not K.route_fits_any(**launch.constexprs, bwd=bwd):
                no_fit.add(p.E)
            if launch.kind == "route":  # slot groups exactly at E = 30
                assert (launch.constexprs["GE"] < launch.constexprs["EP"]) == (p.E == 30), (p, launch.name)
    assert not no_fit


def test_routing_autotuners_prune_by_the_launch():
    """The GPU module's autotuners (a child process: this session may run the interpreter) key on HAS_XE and EMBED
    and prune per launch: route_bwd with x_e drops the 16-warp tile at E = 8; at E = 30 (slot groups) the forward
    keeps every tile, the backward (64, 32) at 8 warps."""
    pytest.importorskip("triton")
    code = """if True:
        from fedamole_kernels import triton_mole_kernels as K
        assert not K.INTERPRETED
        meta = dict(SP=16, EP=8, R=16, ZP=16, TOPK=2, EMBED=True, HAS_XE=True, HAS_SHARED=True, HAS_GP=True)
        for f in (K.route_shrink_fwd, K.route_bwd):
            assert {"HAS_XE", "EMBED"} <= set(f.keys)
            f.nargs = {}
            print(f.base_fn.__name__, [c.num_warps for c in f.prune_configs(meta)],
                  [c.num_warps for c in f.prune_configs({**meta, "EP": 32})])
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["_route_shrink_fwd [8, 8, 16] [8, 8, 16]", "_route_bwd [8, 8] [8]"]


@pytest.mark.slow
def test_routing_kernels_do_not_spill_at_30_experts(tmp_path):
    """E = 30 (EP * R = 512): the routing kernels loop over slot groups of 64 columns; every pruned config, r = 16
    and r = 8, with and without dropout (x_e), compiles for sm_90 without spills."""
    problems = [
        a for p in ("512,10,30,16,0", "512,10,30,16,1", "512,10,30,8,0", "512,10,30,8,1") for a in ("--problem", p)
    ]
    kernels = ("--kernel", "route_shrink_fwd", "--kernel", "route_bwd")
    proc, rows = _resources(tmp_path, *problems, *kernels)
    assert "SPILL" not in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode == 0 and len(rows) == 16, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(r["constexprs"]["GE"] < r["constexprs"]["EP"] for r in rows)
    assert all(0 < r["regs"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0 for r in rows)


def test_roofline_counts_the_launchers_launches():
    """Triton launches per direction as in fedamole_kernels/mole_lora.py's docstring: fwd 2 (route_shrink, expand),
    bwd 4 (route_bwd, 2 seg_wgrad, 1 seg_gemm) + 1 seg_gemm with dropout."""
    for dropout, bwd in ((False, 4), (True, 5)):
        p = Problem(T=64, S=2, E=8, r=8, d_in=64, d_out=64, dropout=dropout)
        assert sum(la.kernel.startswith("_") for la in forward_launches(p)) == 2
        assert sum(la.kernel.startswith("_") for la in backward_launches(p)) == bwd


def test_roofline_reference_setup(tmp_path):
    from roofline import analyse, main

    ref = analyse(Problem(T=REFERENCE["T"], S=1, E=REFERENCE["E"], r=REFERENCE["r"], d_in=4096, d_out=4096))
    # SPEC: the base GEMM is ~137 GFLOP per pass (fwd + input grad: ~278 us at 989 TFLOP/s).
    assert ref["base_us"] == pytest.approx(2 * 2 * 4096**3 / 989e12 * 1e6)
    assert 1.0 < ref["ratio_kernels_only"] <= ref["ratio"]
    assert main(["--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("roofline-h100-*.json")).read_text())
    assert data["reference"]["dominant"] and len(data["grid"]) > 50


def test_bench_gpu_cpu_safe_parts():
    from bench_gpu import parse_args, shapes

    table = shapes()
    assert table[0]["tag"] == "reference" and {s["E"] for s in table} == {6, 8, 30}
    assert len(shapes(quick=True)) == 1 and parse_args(["--quick", "--limit", "3"]).limit == 3
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_suite_refuses_without_a_gpu():
    script = ROOT / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
