"""The Triton backend beyond plain parity (test_parity.py): determinism, the interpreter switch, and compilation of
every kernel for sm_90 without a GPU.

On CPU the kernels run in the Triton interpreter: a module-scoped fixture sets TRITON_INTERPRET=1 for these tests
only (so other test modules do not suddenly see a CPU "triton" backend) and restores it afterwards; the backend
re-decorates its kernels whenever the flag differs from the one they were built under, so it does not matter who
imported Triton first.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from parity import Case, make_inputs, output_grads, run

triton = pytest.importorskip("triton")

from fedamole_kernels import available_backends  # noqa: E402
from fedamole_kernels import triton_mole_lora as tmod  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def test_backward_is_deterministic():
    case = Case((7, 5, 8), expert_input=True)
    inputs, grads = make_inputs(case), output_grads(case)
    first = run("triton", case, inputs, torch.float32, "cpu", grads)
    second = run("triton", case, inputs, torch.float32, "cpu", grads)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_availability_follows_interpreter_flag(monkeypatch):
    assert tmod.is_available(torch.device("cpu"))
    assert "triton" in available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tmod.is_available("cpu")
    assert tmod.is_available("cuda") == torch.cuda.is_available()


def test_kernels_reimported_when_interpret_flag_changes(monkeypatch):
    module = tmod._kernels()
    assert module.INTERPRETED
    # A kernel module decorated without the interpreter (e.g. imported by another test first) gets re-imported.
    monkeypatch.setattr(module, "INTERPRETED", False)
    assert tmod._kernels().INTERPRETED


AOT_SCRIPT = textwrap.dedent("""
    import inspect, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fedamole_kernels import triton_mole_kernels as K

    def build(fn, constexprs, arch, dt="bf16"):
        sig = {}
        for n in inspect.signature(fn.fn).parameters:
            if n in constexprs:
                sig[n] = "constexpr"
            elif n.endswith("_ptr"):
                sig[n] = {"seg_ptr": "*i64", "idx_ptr": "*i64", "mask_ptr": "*i1", "probs_ptr": "*fp32",
                          "gp_ptr": "*fp32"}.get(n, "*" + dt)
            else:
                sig[n] = "fp32" if n in ("scaling", "inv_sqrt_r") else "i32"
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))

    arch = int(sys.argv[1])
    flags = dict(EMBED=True, HAS_XE=True, HAS_SHARED=True, UPCAST=False, PREC="tf32")
    build(K._route_shrink_fwd, dict(SP=2, EP=8, R=16, ZP=16, TOPK=2, GE=8, BM=32, BK=32, **flags), arch)
    build(K._route_bwd, dict(SP=2, EP=2, R=16, TOPK=3, GE=2, HAS_GP=True, BM=32, BK=32, **flags), arch)
    # slot groups (E = 30)
    build(K._route_shrink_fwd, dict(SP=2, EP=32, R=16, ZP=32, TOPK=2, GE=8, BM=64, BK=32, **flags), arch)
    build(K._route_bwd, dict(SP=2, EP=32, R=16, TOPK=3, GE=8, HAS_GP=True, BM=64, BK=32, **flags), arch)
    build(K._seg_gemm, dict(SP=4, HAS_W2=True, HAS_W3=True, ACC=True, UPCAST=False, PREC="tf32", BM=32, BKD=32,
                            BN=32), arch)
    build(K._seg_wgrad, dict(HAS_D2=True, HAS_O2=True, HAS_O3=True, UPCAST=False, PREC="tf32", BM=32, BKD=32,
                             BN=32), arch)
    print("compiled")
""")


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter accepts what the GPU compiler rejects (tl.dot dims < 16, non-constexpr globals): compile
    every kernel for sm_90 ahead of time (ptxas ships with triton, no GPU needed) to catch it on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT, "90"], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available for ahead-of-time compilation")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
