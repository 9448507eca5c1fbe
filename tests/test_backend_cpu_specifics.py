"""Backend "cpu" (C++ extension) beyond plain parity: forced kernel paths, gradcheck, thread determinism, the
registration, torch.compile, the C++ argument checks and the fused autograd op. Parity itself: test_parity.py."""

from __future__ import annotations

import os

import pytest
import torch

from fedamole_kernels import HAS_CPU_EXT, available_backends, mole_lora, resolve_backend

from parity import CASES, Case, check_parity, make_inputs, output_grads, run

pytestmark = pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built (FEDAMOLE_SKIP_CPP_BUILD=1?)")

# The C++ kernels run small problems on the weights in place and larger ones on stacked weights
# ($FEDAMOLE_CPU_SPLIT_MAX_TOKENS forces either path); large T switches the weight gradients from per-block
# partials to a second pass ($FEDAMOLE_CPU_PARTIAL_BYTES=0 forces it).
FORCED_PATHS = {
    "split": {"FEDAMOLE_CPU_SPLIT_MAX_TOKENS": "128"},
    "stacked": {"FEDAMOLE_CPU_SPLIT_MAX_TOKENS": "0"},
    "two_pass_wgrad": {"FEDAMOLE_CPU_PARTIAL_BYTES": "0"},
}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("path", list(FORCED_PATHS))
def test_forced_paths_match_reference(path, case_name, monkeypatch):
    for key, value in FORCED_PATHS[path].items():
        monkeypatch.setenv(key, value)
    check_parity("cpu", CASES[case_name], "fp32")


@pytest.mark.parametrize("path", ["default", *FORCED_PATHS])
def test_wide_output_blocks_match_reference(path, monkeypatch):
    # Several token blocks and output-column blocks per segment (too slow for the Triton interpreter's parity run).
    for key, value in FORCED_PATHS.get(path, {}).items():
        monkeypatch.setenv(key, value)
    check_parity("cpu", Case((150, 3, 200), d_in=40, d_out=300, mask=("1111", "0110", "1011")), "fp32")


@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("expert_input", [False, True])
def test_gradcheck_float64(router_type, expert_input):
    case = Case((4, 0, 3), experts=3, rank=2, d_in=5, d_out=4, router=router_type, expert_input=expert_input)
    inputs = make_inputs(case)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    names = [n for n, v in inputs["floats"].items() if v is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        delta, probs, _ = mole_lora(
            **kw,
            seg_offsets=inputs["seg_offsets"],
            expert_mask=mask,
            top_k=2,
            scaling=1.5,
            router_type=router_type,
            backend="cpu",
        )
        return delta, probs

    args = [inputs["floats"][n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("partial_budget", [None, "0"], ids=["fused_wgrad", "two_pass_wgrad"])
def test_one_and_two_threads_identical(monkeypatch, partial_budget):
    if partial_budget is not None:
        monkeypatch.setenv("FEDAMOLE_CPU_PARTIAL_BYTES", partial_budget)
    case = Case(
        (300, 0, 170, 90), experts=5, d_in=530, d_out=270, expert_input=True, mask=("11111", "11111", "10110", "11111")
    )
    inputs, grads = make_inputs(case), output_grads(case)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run("cpu", case, inputs, torch.float32, "cpu", grads))
    finally:
        torch.set_num_threads(before)
    one, two = results
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_backend_registered_and_default():
    assert "cpu" in available_backends("cpu")
    assert resolve_backend(None, torch.device("cpu")) == "cpu" or "FEDAMOLE_BACKEND" in os.environ


def test_torch_compile_over_cpu_backend():
    inputs = make_inputs(Case((6, 5), d_in=24, d_out=20))
    offsets = inputs["seg_offsets"]

    def fn(x, a, b, w):
        return mole_lora(x, offsets, a, b, w, top_k=2, backend="cpu")[0]

    args = [inputs["floats"][n].float().requires_grad_() for n in ("x", "lora_a", "lora_b", "router")]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    out.sum().backward()
    expected = fn(*[a.detach().clone().requires_grad_() for a in args])
    torch.testing.assert_close(out, expected)
    assert all(a.grad is not None for a in args)


def _float_inputs(case: Case) -> tuple[dict, torch.Tensor]:
    inputs = make_inputs(case)
    return {k: v.float() for k, v in inputs["floats"].items() if v is not None}, inputs["seg_offsets"]


def test_cpp_checks_name_the_tensor():
    t, offsets = _float_inputs(Case((4,), d_in=24, d_out=20))
    mask = torch.ones(1, 4, dtype=torch.bool)
    x, a, b, w = t["x"], t["lora_a"], t["lora_b"], t["router"]
    op = torch.ops.fedamole_ext.mole_lora_fwd
    with pytest.raises(TypeError, match="lora_b has dtype"):
        op(x, None, offsets, a, b.double(), w, None, None, mask, 2, 2.0, "embedding")
    with pytest.raises(ValueError, match="router must have shape"):
        op(x, None, offsets, a, b, w[:, :2], None, None, mask, 2, 2.0, "embedding")
    with pytest.raises(TypeError, match="unsupported dtype"):
        op(x.to(torch.int32), None, offsets, a, b, w, None, None, mask, 2, 2.0, "embedding")
    with pytest.raises(ValueError, match="seg_offsets must end at T"):
        op(x, None, torch.tensor([0, 3]), a, b, w, None, None, mask, 2, 2.0, "embedding")
    with pytest.raises(ValueError, match="router_type"):
        op(x, None, offsets, a, b, w, None, None, mask, 2, 2.0, "bogus")


def _fused(tensors, top_k=2, scaling=1.5, router_type="embedding"):
    names = ("x", "expert_input", "seg_offsets", "lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask")
    return torch.ops.fedamole_ext.mole_lora(*(tensors[n] for n in names), top_k, scaling, router_type)


@pytest.mark.parametrize("num_tokens", [3, 40])
def test_fused_autograd_op_one_segment_weights(num_tokens):
    """fedamole_ext::mole_lora takes one segment's weights without the segment dimension (the layer's layout) and
    returns their gradients in that shape, equal to the stacked call's."""
    inputs, offsets = _float_inputs(Case((num_tokens,), d_in=24, d_out=20, expert_input=True))
    stacked = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    flat = {k: (v[0] if k not in ("x", "expert_input") else v).clone().requires_grad_() for k, v in inputs.items()}
    mask = torch.ones(1, 4, dtype=torch.bool)
    d1, p1, i1 = _fused({**stacked, "seg_offsets": offsets, "expert_mask": mask})
    d2, p2, i2 = _fused({**flat, "seg_offsets": offsets, "expert_mask": mask[0]})
    assert torch.equal(d1, d2) and torch.equal(p1, p2) and torch.equal(i1, i2)
    assert not i2.requires_grad and d2.requires_grad and p2.requires_grad
    w = torch.randn_like(p1)
    (d1.sum() + (p1 * w).sum()).backward()
    (d2.sum() + (p2 * w).sum()).backward()
    for name in stacked:
        assert flat[name].grad.shape == flat[name].shape, name
        torch.testing.assert_close(flat[name].grad, stacked[name].grad.reshape(flat[name].shape), msg=name)


def test_fused_autograd_op_inference_mode_and_no_grad_input():
    inputs, offsets = _float_inputs(Case((5,), d_in=24, d_out=20))
    tensors = {**inputs, "expert_input": None, "seg_offsets": offsets, "expert_mask": torch.ones(1, 4, dtype=bool)}
    with torch.inference_mode():
        delta, probs, idx = _fused(tensors)
    expected = mole_lora(
        inputs["x"],
        offsets,
        inputs["lora_a"],
        inputs["lora_b"],
        inputs["router"],
        inputs["shared_a"],
        inputs["shared_b"],
        top_k=2,
        scaling=1.5,
        backend="reference",
    )
    torch.testing.assert_close(delta, expected[0])
    assert torch.equal(idx, expected[2])
    # Only the probabilities carry a gradient: the delta's grad is materialised as zeros inside the node.
    leaf = inputs["router"].clone().requires_grad_()
    _, probs, _ = _fused({**tensors, "router": leaf})
    (probs[:, 0].sum()).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
