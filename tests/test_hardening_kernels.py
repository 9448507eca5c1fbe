"""Issue 13, kernel rows: every registered op defends itself, and masked slots are absent.

Row 1: the C++ backward with top-k ids that are out of range, masked or repeated (SIGSEGV or silent garbage before).
Row 2: NaN/Inf in a masked slot poisoned every token, on every backend, forward and backward.
Row 4: out-of-range seg_offsets through the custom ops (the reference returned finite garbage; Triton crashed).
Row 15: a wrong last dimension of x was blamed on lora_a.
Calls that crashed the process run in a subprocess, so that a regression fails the test instead of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedamole_kernels import HAS_CPU_EXT, available_backends, mole_lora

from mole_cases import make_problem

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
needs_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")


def run_isolated(source: str, env: dict | None = None, timeout: int = 300) -> list:
    """Runs `source` in a fresh interpreter (tests/ on sys.path); it prints one JSON list, returned here. A crash
    (signal, abort) fails the test with the child's stderr."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=full_env, timeout=timeout)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


OUTCOME = """
def outcome(fn):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__ + ": " + str(exc).splitlines()[0]
    except Exception as exc:
        return "other " + type(exc).__name__ + ": " + str(exc).splitlines()[0]
    return "returned"
"""


# -- row 1: top-k ids in the C++ backward --------------------------------------------------------------------------

BAD_IDS = {"E": 4, "100": 100, "1e9": 10**9, "-5": -5, "masked": 3, "repeat": None}


@needs_ext
def test_cpp_backward_rejects_invalid_topk_ids_on_every_entry_point():
    source = (
        OUTCOME
        + """
import json, torch
from mole_cases import make_problem
from fedamole_kernels import mole_lora
prob = make_problem([3, 2], 4, 2, 5, 3, 2, None).cast(torch.float32)
mask = torch.tensor([[True, True, True, False], [True] * 4])
results = {}
for name, value in BAD_IDS_VALUE.items():
    def tamper(i):
        if value is None:
            i[:, 1] = i[:, 0]
        else:
            i[0, 0] = value
    def fused():
        d, p, i = mole_lora(**prob.kwargs(expert_mask=mask), backend="cpu")
        tamper(i.data)
        d.sum().backward()
    def direct(op, *extra):
        def call():
            t = prob.cast(torch.float32, requires_grad=False)
            d, p, i = torch.ops.fedamole_ext.mole_lora_fwd(t.x, None, t.seg_offsets, t.lora_a, t.lora_b, t.router,
                                                           t.shared_a, t.shared_b, mask, 2, 1.5, "embedding")
            tamper(i)
            tensors = [t.x, None, t.seg_offsets, t.lora_a, t.lora_b, t.router, t.shared_a, t.shared_b, mask]
            op(torch.ones_like(d), None, *(tensors if not extra else [tensors]), p, i, 2, 1.5, "embedding", *extra)
        return call
    results[name] = [outcome(fused), outcome(direct(torch.ops.fedamole_ext.mole_lora_bwd)),
                     outcome(direct(torch.ops.fedamole.mole_lora_bwd, "cpu"))]
print(json.dumps(results))
""".replace("BAD_IDS_VALUE", repr(BAD_IDS))
    )
    for split in ("0", "16"):  # stacked and split (small-problem) paths of the C++ kernels
        results = run_isolated(source, env={"FEDAMOLE_CPU_SPLIT_MAX_TOKENS": split})
        for name, outcomes in results.items():
            for got in outcomes:
                assert got.startswith("ValueError") and "topk_idx" in got, (split, name, got)


# -- row 2: masked means absent ---------------------------------------------------------------------------------------


def _backends():
    return ["reference", "cpu", "triton"]


@pytest.fixture
def backend_on_cpu(monkeypatch):
    def use(name: str) -> str:
        if name == "triton":
            pytest.importorskip("triton")
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        if name not in available_backends("cpu"):
            pytest.skip(f"backend {name!r} not available on CPU here")
        return name

    return use


def _poison(prob, router_type):
    """Copies of the weights with NaN/Inf in slots 2 and 3 of segment 0, which the mask marks absent."""
    a, b, w = prob.lora_a.detach().clone(), prob.lora_b.detach().clone(), prob.router.detach().clone()
    a[0, 3] = float("nan")
    a[0, 2, 0, 0] = float("inf")
    b[0, 2] = float("-inf")
    b[0, 3, 0, 0] = float("nan")
    if router_type == "linear":
        w[0, 3] = float("nan")
        w[0, 2, 0] = float("inf")
    return a, b, w


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("split", ["0", "16"])
@pytest.mark.parametrize("expert_input", [False, True])
def test_nan_in_a_masked_slot_reaches_no_token_and_no_gradient(
    backend, router_type, split, expert_input, backend_on_cpu, monkeypatch
):
    backend_on_cpu(backend)
    if split == "16" and backend != "cpu":
        pytest.skip("the split path is the cpu backend's")
    monkeypatch.setenv("FEDAMOLE_CPU_SPLIT_MAX_TOKENS", split)
    prob = make_problem(
        [5, 3], 4, 2, 6, 5, 2, ["1100", "1111"], router_type=router_type, expert_input=expert_input
    ).cast(torch.float32, requires_grad=False)
    clean = {n: t.clone().requires_grad_() for n, t in prob.float_inputs().items()}
    a, b, w = _poison(prob, router_type)
    dirty = {**{n: t.clone() for n, t in prob.float_inputs().items()}, "lora_a": a, "lora_b": b, "router": w}
    dirty = {n: t.requires_grad_() for n, t in dirty.items()}
    outs = {}
    for label, inputs in (("clean", clean), ("dirty", dirty)):
        delta, probs, idx = mole_lora(**prob.kwargs(**inputs), backend=backend)
        (delta * torch.linspace(-1, 1, delta.numel()).view(delta.shape)).sum().add(probs.square().sum()).backward()
        outs[label] = (delta, probs, idx)
    assert torch.isfinite(outs["dirty"][0]).all() and torch.isfinite(outs["dirty"][1]).all()
    torch.testing.assert_close(outs["dirty"][0], outs["clean"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["dirty"][1], outs["clean"][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(outs["dirty"][2], outs["clean"][2])
    for name, t in dirty.items():
        assert torch.isfinite(t.grad).all(), f"grad of {name} is not finite"
    for name in ("lora_a", "lora_b") + (("router",) if router_type == "linear" else ()):
        absent = dirty[name].grad[0, 2:]
        assert torch.equal(absent, torch.zeros_like(absent)), f"grad of {name} in masked slots must be exactly 0"
        present = (dirty[name].grad[0, :2], clean[name].grad[0, :2], dirty[name].grad[1], clean[name].grad[1])
        torch.testing.assert_close(present[0], present[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(present[2], present[3], rtol=1e-5, atol=1e-6)


# -- row 4: seg_offsets through the custom ops ------------------------------------------------------------------------

BAD_OFFSETS = [[0, 1000, 8], [0, 3, 1000], [0, 6, 3], [-4, 3, 8], [2, 3, 8], [0, 3, 7], [0, -(10**12), 8]]


def _op_args(prob):
    t = prob.cast(torch.float32, requires_grad=False)
    mask = torch.ones(t.lora_a.shape[:2], dtype=torch.bool)
    return t, (t.x, None, t.seg_offsets, t.lora_a, t.lora_b, t.router, t.shared_a, t.shared_b, mask)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=str)
def test_custom_ops_reject_invalid_offsets(backend, offsets, backend_on_cpu):
    backend_on_cpu(backend)
    t, args = _op_args(make_problem([3, 5], 3, 2, 5, 4, 2, None))
    bad = torch.tensor(offsets)
    fwd_args = (args[0], None, bad, *args[3:])
    with pytest.raises(ValueError, match="seg_offsets"):
        torch.ops.fedamole.mole_lora_fwd(list(fwd_args), 2, 2.0, "embedding", backend)
    delta, probs, idx = torch.ops.fedamole.mole_lora_fwd(list(args), 2, 2.0, "embedding", backend)
    with pytest.raises(ValueError, match="seg_offsets"):
        torch.ops.fedamole.mole_lora_bwd(
            torch.ones_like(delta), None, list(fwd_args), probs, idx, 2, 2.0, "embedding", backend
        )
    with pytest.raises(ValueError, match="seg_offsets"):
        mole_lora(t.x, bad, t.lora_a, t.lora_b, t.router, backend=backend, check_offsets=False)


def test_triton_launchers_reject_invalid_offsets_ids_and_shapes_without_crashing():
    pytest.importorskip("triton")
    source = (
        OUTCOME
        + """
import json, torch
from mole_cases import make_problem
from fedamole_kernels import mole_lora, triton_mole_lora as tm
from fedamole_kernels.problem import MoLEProblem
fwd = lambda a: tm.TritonBackend().forward(MoLEProblem(*a, 2, 2.0, "embedding"))
bwd = lambda g, a, p, i: tm.TritonBackend().backward(MoLEProblem(*a, 2, 2.0, "embedding"), g, None, p, i)
t = make_problem([3, 5], 3, 2, 5, 4, 2, None).cast(torch.float32, requires_grad=False)
mask = torch.tensor([[True, True, False], [True, True, True]])
args = [t.x, None, t.seg_offsets, t.lora_a, t.lora_b, t.router, t.shared_a, t.shared_b, mask]
res = {}
for offs in BAD_OFFSETS_VALUE:
    bad = list(args); bad[2] = torch.tensor(offs)
    res["fwd " + str(offs)] = outcome(lambda: fwd(bad))
    res["op " + str(offs)] = outcome(lambda: torch.ops.fedamole.mole_lora_fwd(list(bad), 2, 2.0, "embedding", "triton"))
    res["api " + str(offs)] = outcome(lambda: mole_lora(t.x, bad[2], t.lora_a, t.lora_b, t.router, backend="triton",
                                                        check_offsets=False))
delta, probs, idx = fwd(args)
g = torch.ones_like(delta)
for offs in BAD_OFFSETS_VALUE:
    bad = list(args); bad[2] = torch.tensor(offs)
    res["bwd " + str(offs)] = outcome(lambda: bwd(g, bad, probs, idx))
for name, value in (("E", 3), ("1e9", 10**9), ("-5", -5), ("masked", 2), ("2**32+1", 2**32 + 1)):
    i = idx.clone(); i[0, 0] = value
    res["ids " + name] = outcome(lambda: bwd(g, args, probs, i))
i = idx.clone(); i[:, 1] = i[:, 0]
res["ids repeat"] = outcome(lambda: bwd(g, args, probs, i))
shapes = {"lora_b": t.lora_b[..., :1], "router": t.router[:1], "shared_b": t.shared_b[..., :1],
          "expert_mask": mask[:, :2], "x": t.x[:4]}
for name, value in shapes.items():
    slot = ["x", None, None, None, "lora_b", "router", None, "shared_b", "expert_mask"].index(name)
    bad = list(args); bad[slot] = value
    res["shape " + name] = outcome(lambda: fwd(bad))
res["shape probs"] = outcome(lambda: bwd(g, args, probs[:, :2], idx))
res["shape topk_idx"] = outcome(lambda: bwd(g, args, probs, idx[:, :1]))
print(json.dumps(res))
""".replace("BAD_OFFSETS_VALUE", repr(BAD_OFFSETS))
    )
    results = run_isolated(source, env={"TRITON_INTERPRET": "1"})
    for name, got in results.items():
        assert got.startswith(("ValueError", "TypeError")), (name, got)
        word = name.split()[0]
        expected = {"ids": "topk_idx", "shape": name.split()[-1]}.get(word, "seg_offsets")
        assert expected in got, (name, got)


def test_reference_op_checks_shapes_it_was_given():
    t, args = _op_args(make_problem([3, 5], 3, 2, 5, 4, 2, None))
    bad = list(args)
    bad[4] = t.lora_b[:, :, :, :1]
    with pytest.raises(ValueError, match="lora_b"):
        torch.ops.fedamole.mole_lora_fwd(list(bad), 2, 2.0, "embedding", "reference")
    delta, probs, idx = torch.ops.fedamole.mole_lora_fwd(list(args), 2, 2.0, "embedding", "reference")
    with pytest.raises(ValueError, match="topk_idx"):
        torch.ops.fedamole.mole_lora_bwd(
            torch.ones_like(delta), None, list(args), probs, idx.clamp(max=0) + 3, 2, 2.0, "embedding", "reference"
        )
    with pytest.raises(ValueError, match="grad_delta"):
        torch.ops.fedamole.mole_lora_bwd(
            delta[:, :1].contiguous(), None, list(args), probs, idx, 2, 2.0, "embedding", "reference"
        )


# -- row 15: the wrong d_in names x -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_wrong_feature_dimension_of_x_names_x(backend, backend_on_cpu):
    backend_on_cpu(backend)
    t, args = _op_args(make_problem([3, 5], 3, 2, 7, 4, 2, None))
    with pytest.raises(ValueError, match=r"^x must have shape \[T, d_in=7\]"):
        mole_lora(t.x[:, :5], t.seg_offsets, t.lora_a, t.lora_b, t.router, backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[T, d_in=7\]"):
        torch.ops.fedamole.mole_lora_fwd([t.x[:, :5].contiguous(), *args[1:]], 2, 2.0, "embedding", backend)
