"""Backend "cpu" (C++ extension) against the reference: forward, every gradient, edge cases, determinism."""

from __future__ import annotations

import pytest
import torch

from fedamole_kernels import HAS_CPU_EXT, available_backends, mole_lora, resolve_backend

pytestmark = pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built (FEDAMOLE_SKIP_CPP_BUILD=1?)")

FLOAT_INPUTS = ("x", "expert_input", "lora_a", "lora_b", "router", "shared_a", "shared_b")


def make_inputs(
    seg_sizes,
    num_slots=4,
    rank=4,
    d_in=24,
    d_out=20,
    router_type="embedding",
    shared=True,
    expert_input=False,
    mask=None,
    skew=0.0,
    dtype=torch.float32,
    seed=0,
):
    """Random inputs; `skew` > 0 makes slot 0 dominate the routing (most tokens pick it)."""
    g = torch.Generator().manual_seed(seed)
    num_segments = len(seg_sizes)
    num_tokens = sum(seg_sizes)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    router_rows = rank if router_type == "embedding" else num_slots
    inputs = {
        "x": rand(num_tokens, d_in),
        "lora_a": rand(num_segments, num_slots, rank, d_in, scale=d_in**-0.5),
        "lora_b": rand(num_segments, num_slots, d_out, rank, scale=rank**-0.5),
        "router": rand(num_segments, router_rows, d_in, scale=d_in**-0.5),
        "shared_a": rand(num_segments, rank, d_in, scale=d_in**-0.5) if shared else None,
        "shared_b": rand(num_segments, d_out, rank, scale=rank**-0.5) if shared else None,
        "expert_input": rand(num_tokens, d_in) if expert_input else None,
    }
    if skew:
        # Align slot 0's routing direction with the router so its score dominates for most tokens.
        if router_type == "embedding":
            inputs["lora_a"][:, 0] += skew * inputs["router"]
        else:
            inputs["router"][:, 0] += skew * inputs["x"].mean(0)
    inputs = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    offsets = torch.tensor([0, *torch.tensor(seg_sizes).cumsum(0).tolist()], dtype=torch.int64)
    if mask is not None:
        mask = torch.tensor(mask, dtype=torch.bool)
    return inputs, offsets, mask


def run(backend, inputs, offsets, mask, top_k, router_type, scaling=2.0, probs_loss=True, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    full = {k: leaves.get(k) for k in FLOAT_INPUTS}
    delta, probs, idx = mole_lora(
        full["x"],
        offsets,
        full["lora_a"],
        full["lora_b"],
        full["router"],
        full["shared_a"],
        full["shared_b"],
        mask,
        full["expert_input"],
        top_k=top_k,
        scaling=scaling,
        router_type=router_type,
        backend=backend,
    )
    g = torch.Generator().manual_seed(seed)
    loss = (delta.double() * torch.randn(delta.shape, generator=g, dtype=torch.float64)).sum()
    if probs_loss:
        loss = loss + (probs.double() * torch.randn(probs.shape, generator=g, dtype=torch.float64)).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return delta.detach(), probs.detach(), idx, dict(zip(names, grads))


def assert_close(actual, expected, rtol, atol_scale, what):
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    atol = atol_scale * max(e.abs().max().item(), 1e-3)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


CASES = {
    # name: (make_inputs kwargs, top_k)
    "odd_sizes": (dict(seg_sizes=[37], num_slots=5, rank=3, d_in=19, d_out=13), 2),
    "one_token": (dict(seg_sizes=[1]), 2),
    "one_slot_lt_k": (dict(seg_sizes=[9], num_slots=1), 2),
    "k_eq_E": (dict(seg_sizes=[11], num_slots=3), 3),
    "k_gt_E": (dict(seg_sizes=[6, 5], num_slots=2), 3),
    "empty_segments": (dict(seg_sizes=[0, 9, 0, 14, 0]), 2),
    "hetero_masks": (dict(seg_sizes=[8, 5, 7], mask=[[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]), 2),
    "all_masked_segment": (dict(seg_sizes=[6, 7], mask=[[0, 0, 0, 0], [1, 0, 1, 0]]), 2),
    "no_shared": (dict(seg_sizes=[10, 12], shared=False), 2),
    "expert_input": (dict(seg_sizes=[13, 4], expert_input=True), 2),
    "expert_input_no_shared_masked": (
        dict(seg_sizes=[7, 9], expert_input=True, shared=False, mask=[[1, 1, 0, 1], [0, 1, 0, 0]]),
        2,
    ),
    "skewed": (dict(seg_sizes=[40, 25], skew=4.0), 2),
    "many_tokens_blocks": (dict(seg_sizes=[150, 3, 200], d_in=40, d_out=300), 2),
    "top1": (dict(seg_sizes=[12], num_slots=6), 1),
}


# The C++ kernels run small problems on the weights in place (one GEMM per part, only the selected experts'
# up-projections) and larger ones on stacked weights; $FEDAMOLE_CPU_SPLIT_MAX_TOKENS forces either path.
SPLIT_PATHS = {"default": None, "split": "128", "stacked": "0"}


@pytest.mark.parametrize("path", sorted(SPLIT_PATHS))
@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_fp32(case, router_type, path, monkeypatch):
    if SPLIT_PATHS[path] is not None:
        monkeypatch.setenv("FEDAMOLE_CPU_SPLIT_MAX_TOKENS", SPLIT_PATHS[path])
    kwargs, top_k = CASES[case]
    inputs, offsets, mask = make_inputs(router_type=router_type, **kwargs)
    ref = run("reference", inputs, offsets, mask, top_k, router_type)
    out = run("cpu", inputs, offsets, mask, top_k, router_type)
    assert torch.equal(out[2], ref[2]), "topk_idx"
    assert_close(out[0], ref[0], 1e-5, 1e-5, "delta")
    assert_close(out[1], ref[1], 1e-5, 1e-6, "probs")
    assert out[1].dtype == torch.float32
    if mask is not None:
        assert (out[1][:, :][torch.repeat_interleave(~mask, torch.diff(offsets), dim=0)] == 0).all()
    assert set(out[3]) == set(ref[3])
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("probs_loss", [False, True])
def test_grad_probs_optional(probs_loss):
    inputs, offsets, _ = make_inputs([10, 7])
    ref = run("reference", inputs, offsets, None, 2, "embedding", probs_loss=probs_loss)
    out = run("cpu", inputs, offsets, None, 2, "embedding", probs_loss=probs_loss)
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], 1e-4, 1e-5, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router_type", ["embedding", "linear"])
def test_low_precision(dtype, router_type):
    inputs, offsets, mask = make_inputs(
        [20, 0, 13],
        expert_input=True,
        router_type=router_type,
        dtype=dtype,
        mask=[[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]],
    )
    ref = run("reference", inputs, offsets, mask, 2, router_type)
    out = run("cpu", inputs, offsets, mask, 2, router_type)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    # Both backends compute in fp32 from the same low-precision inputs: only rounding of the outputs differs.
    assert torch.equal(out[2], ref[2])
    assert_close(out[0], ref[0], 2e-2, 2e-2, "delta")
    assert_close(out[1], ref[1], 1e-5, 1e-5, "probs")
    for name in ref[3]:
        assert out[3][name].dtype == dtype
        assert_close(out[3][name], ref[3][name], 2e-2, 2e-2, f"grad {name}")


@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("expert_input", [False, True])
def test_gradcheck_float64(router_type, expert_input):
    inputs, offsets, mask = make_inputs(
        [4, 0, 3],
        num_slots=3,
        rank=2,
        d_in=5,
        d_out=4,
        router_type=router_type,
        expert_input=expert_input,
        dtype=torch.float64,
        mask=[[1, 1, 1], [1, 0, 1], [0, 1, 1]],
    )
    names = [n for n in FLOAT_INPUTS if inputs[n] is not None]

    def fn(*tensors):
        t = dict(zip(names, tensors))
        delta, probs, _ = mole_lora(
            t["x"],
            offsets,
            t["lora_a"],
            t["lora_b"],
            t["router"],
            t.get("shared_a"),
            t.get("shared_b"),
            mask,
            t.get("expert_input"),
            top_k=2,
            scaling=1.5,
            router_type=router_type,
            backend="cpu",
        )
        return delta, probs

    args = [inputs[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("partial_budget", [None, "0"], ids=["fused_wgrad", "two_pass_wgrad"])
def test_one_and_two_threads_identical(monkeypatch, partial_budget):
    if partial_budget is not None:
        monkeypatch.setenv("FEDAMOLE_CPU_PARTIAL_BYTES", partial_budget)
    inputs, offsets, mask = make_inputs(
        [300, 0, 170, 90],
        num_slots=5,
        rank=4,
        d_in=530,
        d_out=270,
        expert_input=True,
        mask=[[1] * 5, [1] * 5, [1, 0, 1, 1, 0], [1] * 5],
    )
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run("cpu", inputs, offsets, mask, 2, "embedding"))
    finally:
        torch.set_num_threads(before)
    one, two = results
    for a, b in zip(one[:3], two[:3]):
        assert torch.equal(a, b)
    for name in one[3]:
        assert torch.equal(one[3][name], two[3][name]), name


@pytest.mark.parametrize("expert_input", [False, True])
def test_two_pass_weight_grads(monkeypatch, expert_input):
    # Large T switches the weight grads from per-block partials to a second pass; force it on a small problem.
    monkeypatch.setenv("FEDAMOLE_CPU_PARTIAL_BYTES", "0")
    inputs, offsets, mask = make_inputs(
        [140, 0, 9], d_in=300, expert_input=expert_input, mask=[[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]
    )
    ref = run("reference", inputs, offsets, mask, 2, "embedding")
    out = run("cpu", inputs, offsets, mask, 2, "embedding")
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], 1e-4, 1e-5, f"grad {name}")


def test_ties_pick_lowest_index():
    # Identical linear-router rows give identical logits: the top-k must be the lowest active slots.
    inputs, offsets, _ = make_inputs([5], num_slots=5, router_type="linear")
    inputs["router"] = inputs["router"][:, :1].expand(1, 5, -1).contiguous()
    mask = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    _, probs, idx, _ = run("cpu", inputs, offsets, mask, 2, "linear")
    assert (idx == torch.tensor([1, 2])).all()
    torch.testing.assert_close(probs[0], torch.tensor([0, 1 / 3, 1 / 3, 0, 1 / 3]))


def test_topk_padding_and_all_masked():
    inputs, offsets, mask = make_inputs([3, 4], num_slots=3, mask=[[0, 0, 0], [0, 1, 0]])
    delta, probs, idx, _ = run("cpu", inputs, offsets, mask, 2, "embedding")
    assert (idx[:3] == -1).all() and (probs[:3] == 0).all()
    assert (idx[3:, 0] == 1).all() and (idx[3:, 1] == -1).all()
    assert (probs[3:, 1] == 1).all()


def test_backend_registered_and_default():
    assert "cpu" in available_backends("cpu")
    assert resolve_backend(None, torch.device("cpu")) in ("cpu",) or "FEDAMOLE_BACKEND" in __import__("os").environ


def test_route_op_counts():
    from fedamole_kernels.cpu_mole_lora import mole_route

    inputs, offsets, mask = make_inputs([30, 0, 17], mask=[[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    delta, probs, idx, _ = run("cpu", inputs, offsets, mask, 2, "embedding")
    r_probs, r_idx, counts = mole_route(inputs["x"], offsets, inputs["lora_a"], inputs["router"], mask, 2)
    assert torch.equal(r_idx, idx)
    torch.testing.assert_close(r_probs, probs)
    assert counts.shape == (3, 4) and counts.dtype == torch.int64
    for s in range(3):
        seg = idx[offsets[s] : offsets[s + 1]].flatten()
        expected = torch.bincount(seg[seg >= 0], minlength=4)
        assert torch.equal(counts[s], expected)


def test_torch_compile_over_cpu_backend():
    inputs, offsets, _ = make_inputs([6, 5])

    def fn(x, a, b, w):
        return mole_lora(x, offsets, a, b, w, top_k=2, backend="cpu")[0]

    args = [inputs[n].clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "router")]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    out.sum().backward()
    expected = fn(*[a.detach().clone().requires_grad_() for a in args])
    torch.testing.assert_close(out, expected)
    assert all(a.grad is not None for a in args)


def test_cpp_checks_name_the_tensor():
    inputs, offsets, _ = make_inputs([4])
    mask = torch.ones(1, 4, dtype=torch.bool)
    x, a, b, w = inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["router"]
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


@pytest.mark.parametrize("path", sorted(SPLIT_PATHS))
@pytest.mark.parametrize("num_tokens", [1, 5, 17])
@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("expert_input", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_small_and_stacked_paths_match_reference(num_tokens, router_type, expert_input, shared, path, monkeypatch):
    if SPLIT_PATHS[path] is not None:
        monkeypatch.setenv("FEDAMOLE_CPU_SPLIT_MAX_TOKENS", SPLIT_PATHS[path])
    inputs, offsets, mask = make_inputs(
        [num_tokens],
        num_slots=6,
        router_type=router_type,
        shared=shared,
        expert_input=expert_input,
        mask=[[1, 1, 0, 1, 1, 1]],
    )
    ref = run("reference", inputs, offsets, mask, 2, router_type)
    out = run("cpu", inputs, offsets, mask, 2, router_type)
    assert torch.equal(out[2], ref[2])
    assert_close(out[0], ref[0], 1e-5, 1e-5, "delta")
    assert set(out[3]) == set(ref[3])
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], 1e-4, 1e-5, f"grad {name}")
    assert (out[3]["lora_b"][0, 2] == 0).all(), "a masked slot gets no B gradient"


def _fused(tensors, top_k=2, scaling=1.5, router_type="embedding"):
    names = ("x", "expert_input", "seg_offsets", "lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask")
    return torch.ops.fedamole_ext.mole_lora(*(tensors[n] for n in names), top_k, scaling, router_type)


@pytest.mark.parametrize("num_tokens", [3, 40])
def test_fused_autograd_op_one_segment_weights(num_tokens):
    """fedamole_ext::mole_lora takes one segment's weights without the segment dimension (the layer's layout) and
    returns their gradients in that shape, equal to the stacked call's."""
    inputs, offsets, _ = make_inputs([num_tokens], expert_input=True)
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
    inputs, offsets, _ = make_inputs([5])
    tensors = {**inputs, "seg_offsets": offsets, "expert_mask": torch.ones(1, 4, dtype=torch.bool)}
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
