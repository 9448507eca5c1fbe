"""The Triton backend against the reference: forward outputs and every gradient, over edge cases.

On CPU the kernels run in the Triton interpreter: a module-scoped fixture sets TRITON_INTERPRET=1 for these tests
only (so other test modules do not suddenly see a CPU "triton" backend) and restores it afterwards; the backend
re-decorates its kernels whenever the flag differs from the one they were built under, so it does not matter who
imported Triton first. Shapes stay tiny: the interpreter costs per program and per op. GPU tests (bf16 included,
larger shapes) are marked `gpu`.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from fedamole_kernels import available_backends, mole_lora  # noqa: E402
from fedamole_kernels import triton_mole_lora as tmod  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


ROOT = Path(__file__).resolve().parents[1]
# Max error relative to max(1, |reference|max), per dtype (half types: inputs and rank-space buffers round).
TOL = {torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 6e-2}


def make_case(
    T=13,
    S=1,
    E=3,
    r=4,
    d_in=19,
    d_out=11,
    top_k=2,
    router="embedding",
    shared=True,
    xe=False,
    mask=None,
    offsets=None,
    dtype=torch.float32,
    device="cpu",
    skew=False,
    seed=0,
):
    """Random inputs (A, B, W_t ~ 0.3 N(0, 1) so that routing is neither flat nor one-hot)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    x = rnd(T, d_in)
    lora_a = rnd(S, E, r, d_in, scale=0.3)
    lora_b = rnd(S, E, d_out, r, scale=0.3)
    router_w = rnd(S, r if router == "embedding" else E, d_in, scale=0.3)
    if skew:  # expert 0's embedding aligned with the token embedding: every token routes to slot 0 first
        if router == "embedding":
            lora_a[:, 0] = 4.0 * router_w
        else:
            x[:, 0] = 5.0  # a feature only slot 0's router row reads
            router_w[:, :, 0] = 0.0
            router_w[:, 0] = 0.0
            router_w[:, 0, 0] = 2.0
    if offsets is None:
        cuts = sorted(torch.randint(0, T + 1, (S - 1,), generator=gen).tolist())
        offsets = [0, *cuts, T]
    kw = dict(
        x=x,
        seg_offsets=torch.tensor(offsets, device=device),
        lora_a=lora_a,
        lora_b=lora_b,
        router=router_w,
        shared_a=rnd(S, r, d_in, scale=0.3) if shared else None,
        shared_b=rnd(S, d_out, r, scale=0.3) if shared else None,
        expert_mask=None if mask is None else torch.tensor(mask, dtype=torch.bool, device=device),
        expert_input=rnd(T, d_in) if xe else None,
        top_k=top_k,
        scaling=2.0,
        router_type=router,
    )
    return kw


FLOAT_ARGS = ("x", "lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_input")


def run_backend(kw, backend, grad_out, grad_probs):
    """Forward + backward of `backend` on leaf copies of the float inputs; returns outputs and grads by name."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in kw.items() if k in FLOAT_ARGS and v is not None}
    delta, probs, idx = mole_lora(**{**kw, **leaves}, backend=backend)
    loss = (delta.float() * grad_out).sum()
    if grad_probs is not None:
        loss = loss + (probs * grad_probs).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return delta, probs, idx, dict(zip(leaves, grads))


def assert_close(name, got, want, dtype):
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    assert err <= TOL[dtype] * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def check_against_reference(kw, with_grad_probs=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    T, d_out, E = kw["x"].shape[0], kw["lora_b"].shape[2], kw["lora_a"].shape[1]
    dev = kw["x"].device
    grad_out = torch.randn(T, d_out, generator=gen).to(dev)
    grad_probs = torch.randn(T, E, generator=gen).to(dev) if with_grad_probs else None
    ref = run_backend(kw, "reference", grad_out, grad_probs)
    tri = run_backend(kw, "triton", grad_out, grad_probs)
    dtype = kw["x"].dtype
    assert tri[0].dtype == dtype and tri[1].dtype == torch.float32 and tri[2].dtype == torch.int64
    assert torch.equal(tri[2], ref[2]), "topk_idx differs"
    assert_close("delta", tri[0], ref[0], dtype)
    assert_close("probs", tri[1], ref[1], torch.float32 if dtype == torch.float32 else torch.float16)
    assert set(tri[3]) == set(ref[3])
    for name in ref[3]:
        assert tri[3][name].dtype == ref[3][name].dtype
        assert_close(f"grad {name}", tri[3][name], ref[3][name], dtype)
    return tri


CASES = {
    "basic": dict(),
    "odd_linear_xe": dict(S=2, router="linear", xe=True, d_in=23, d_out=9),
    "one_token": dict(T=1, E=4, d_in=5, d_out=3),
    "e1_k1": dict(E=1, top_k=1, shared=False),
    "e1_k3_linear": dict(E=1, top_k=3, router="linear"),
    "k_equals_e": dict(E=4, top_k=4, r=16, d_in=70, d_out=67),
    "k_gt_e_masked": dict(E=4, top_k=5, S=2, mask=[[1, 0, 1, 1], [0, 1, 0, 0]]),
    "empty_and_all_masked": dict(
        T=40, S=4, offsets=[0, 0, 33, 33, 40], xe=True, mask=[[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 0, 0]]
    ),
    "all_masked_linear": dict(T=9, S=2, offsets=[0, 4, 9], router="linear", mask=[[0, 0, 0], [1, 1, 0]]),
    "no_shared_xe_embed": dict(shared=False, xe=True, r=3, E=5, top_k=3),
    "skew_embedding": dict(T=30, E=4, skew=True),
    "skew_linear": dict(T=30, E=4, skew=True, router="linear", top_k=1),
    # 64 segments with lengths 0, 1, 0, 2, ... (half of them empty), 48 tokens.
    "s64_many_empty": dict(
        T=48,
        S=64,
        E=2,
        r=2,
        d_in=9,
        d_out=7,
        top_k=1,
        offsets=[0] + [sum((0, 1, 0, 2)[j % 4] for j in range(i + 1)) for i in range(64)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    kw = make_case(**CASES[name])
    tri = check_against_reference(kw, with_grad_probs=name != "basic")
    if CASES[name].get("skew"):
        assert bool((tri[2][:, 0] == 0).all()), "skewed routing should send every token to slot 0 first"


@pytest.mark.parametrize("name", ["basic", "odd_linear_xe", "k_gt_e_masked", "empty_and_all_masked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_matches_reference(name, dtype):
    # bf16 works on CPU because the kernels upcast bf16 tl.dot operands under the interpreter.
    check_against_reference(make_case(**CASES[name], dtype=dtype))


def test_empty_batch_and_fp64_fallback():
    kw = make_case(T=0, S=2, offsets=[0, 0, 0])
    tri = run_backend(kw, "triton", torch.zeros(0, 11), None)
    assert tri[0].shape == (0, 11) and tri[2].shape == (0, 2)
    assert all(float(g.abs().sum()) == 0.0 for g in tri[3].values())
    kw64 = make_case(dtype=torch.float64)
    ref = mole_lora(**kw64, backend="reference")
    tri64 = mole_lora(**kw64, backend="triton")
    assert torch.equal(ref[0], tri64[0])


def test_backward_is_deterministic():
    kw = make_case(T=20, S=3, E=4, xe=True)
    gen = torch.Generator().manual_seed(3)
    g, gp = torch.randn(20, 11, generator=gen), torch.randn(20, 4, generator=gen)
    first, second = run_backend(kw, "triton", g, gp), run_backend(kw, "triton", g, gp)
    for name in first[3]:
        assert torch.equal(first[3][name], second[3][name]), name


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
    build(K._route_shrink_fwd, dict(SP=2, EP=8, R=16, ZP=16, TOPK=2, BM=32, BK=32, **flags), arch)
    build(K._route_bwd, dict(SP=2, EP=2, R=16, TOPK=3, HAS_GP=True, BM=32, BK=32, **flags), arch)
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


GPU_CASES = {
    "bench_like": dict(T=1000, S=8, E=8, r=8, d_in=256, d_out=384, top_k=2, mask=[[1] * 6 + [0] * 2] * 8),
    "r16_linear_xe": dict(T=777, S=3, E=8, r=16, d_in=200, d_out=130, router="linear", xe=True),
    "odd_small": dict(T=5, S=2, E=3, r=5, d_in=19, d_out=11, top_k=4),
    "s64_many_empty": CASES["s64_many_empty"],
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_matches_reference(name, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_against_reference(make_case(**GPU_CASES[name], dtype=dtype, device="cuda"))
