"""The reference backend of `mole_lora` against an independent per-token oracle, gradcheck and opcheck."""

import pytest
import torch

from fedamole_kernels import available_backends, mole_lora

from mole_cases import all_problems, make_problem, naive_mole_lora

PROBLEMS = all_problems()


def _loss_weights(delta, probs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(delta.shape, generator=gen, dtype=torch.float64).to(delta.dtype),
        torch.randn(probs.shape, generator=gen, dtype=torch.float64).to(probs.dtype),
    )


@pytest.mark.parametrize("spec", [p[1] for p in PROBLEMS], ids=[p[0] for p in PROBLEMS])
def test_reference_matches_naive_loop(spec):
    prob = make_problem(**spec).cast(torch.float64)
    inputs = prob.float_inputs()
    delta, probs, topk_idx = mole_lora(**prob.kwargs(), backend="reference")
    n_delta, n_probs, chosen = naive_mole_lora(prob)

    assert delta.dtype == torch.float64 and topk_idx.dtype == torch.int64
    assert topk_idx.shape == (prob.x.shape[0], prob.top_k)
    torch.testing.assert_close(delta, n_delta, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(probs, n_probs, rtol=1e-10, atol=1e-10)
    for t, expected in enumerate(chosen):
        row = topk_idx[t].tolist()
        assert set(i for i in row if i >= 0) == expected
        assert row.count(-1) == prob.top_k - len(expected)
        assert row[: len(expected)] == [i for i in row if i >= 0], "-1 padding must come last"

    gd, gp = _loss_weights(delta, probs)
    names = list(inputs)
    got = torch.autograd.grad((delta * gd).sum() + (probs * gp).sum(), [inputs[n] for n in names], allow_unused=True)
    want = torch.autograd.grad(
        (n_delta * gd).sum() + (n_probs * gp).sum(), [inputs[n] for n in names], allow_unused=True
    )
    for name, g, w in zip(names, got, want):
        w = torch.zeros_like(inputs[name]) if w is None else w
        g = torch.zeros_like(inputs[name]) if g is None else g
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_masked_slots_get_zero_probability_and_no_gradient():
    prob = make_problem([4, 3], 4, 2, 5, 3, 2, ["1010", "0111"]).cast(torch.float64)
    delta, probs, idx = mole_lora(**prob.kwargs(), backend="reference")
    assert (probs[:4, 1] == 0).all() and (probs[:4, 3] == 0).all() and (probs[4:, 0] == 0).all()
    assert not (idx[:4] == 1).any() and not (idx[4:] == 0).any()
    (delta.sum() + probs.sum()).backward()
    assert (prob.lora_a.grad[0, 1] == 0).all() and (prob.lora_b.grad[1, 0] == 0).all()


@pytest.mark.parametrize("router_type", ["embedding", "linear"])
def test_skewed_routing_sends_every_token_to_one_expert(router_type):
    prob = make_problem([9], 4, 3, 6, 4, 1, None, router_type=router_type, skew=True).cast(torch.float64)
    _, probs, idx = mole_lora(**prob.kwargs(), backend="reference")
    assert (idx[:, 0] == 0).all()
    assert (probs[:, 0] > 0.99).all()


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)]
)
def test_low_precision_matches_float64(dtype, rtol, atol):
    base = make_problem([6, 5], 4, 4, 16, 12, 2, ["1111", "0111"], expert_input=True)
    low = base.cast(dtype)
    # Give float64 exactly the rounded low-precision values so only the arithmetic differs.
    high = low.cast(torch.float64)
    d_low, p_low, i_low = mole_lora(**low.kwargs(), backend="reference")
    d_high, p_high, i_high = mole_lora(**high.kwargs(), backend="reference")
    assert d_low.dtype == dtype and p_low.dtype == torch.float32
    assert torch.equal(i_low, i_high)
    torch.testing.assert_close(d_low.double(), d_high, rtol=rtol, atol=atol * d_high.abs().max().item())
    torch.testing.assert_close(p_low.double(), p_high, rtol=1e-5, atol=1e-6)
    d_low.float().sum().backward()
    d_high.sum().backward()
    for name in ("x", "lora_a", "lora_b", "router", "shared_a", "expert_input"):
        g_low, g_high = getattr(low, name).grad.double(), getattr(high, name).grad
        torch.testing.assert_close(
            g_low, g_high, rtol=rtol, atol=atol * g_high.abs().max().item(), msg=lambda m, n=name: f"grad of {n}: {m}"
        )


@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("expert_input", [False, True])
def test_gradcheck_float64(router_type, expert_input):
    prob = make_problem(
        [3, 0, 2], 3, 2, 4, 3, 2, ["111", "000", "101"], router_type=router_type, expert_input=expert_input
    ).cast(torch.float64)
    inputs = prob.float_inputs()
    names = list(inputs)

    def fn(*tensors):
        delta, probs, _ = mole_lora(**prob.kwargs(**dict(zip(names, tensors))), backend="reference")
        return delta, probs

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names), eps=1e-6, atol=1e-6)


def test_opcheck_custom_ops():
    prob = make_problem([3, 2], 3, 2, 4, 5, 2, ["111", "011"], expert_input=True).cast(
        torch.float32, requires_grad=False
    )
    tensors = [
        prob.x,
        prob.expert_input,
        prob.seg_offsets,
        prob.lora_a,
        prob.lora_b,
        prob.router,
        prob.shared_a,
        prob.shared_b,
        prob.expert_mask,
    ]
    fwd_args = (
        tensors,
        2,
        1.5,
        "embedding",
        "reference",
    )
    torch.library.opcheck(torch.ops.fedamole.mole_lora_fwd.default, fwd_args)
    delta, probs, idx = torch.ops.fedamole.mole_lora_fwd(*fwd_args)
    bwd_args = (
        torch.randn_like(delta),
        torch.randn_like(probs),
        tensors,
        probs,
        idx,
        2,
        1.5,
        "embedding",
        "reference",
    )
    torch.library.opcheck(torch.ops.fedamole.mole_lora_bwd.default, bwd_args)
    no_shared = (
        torch.randn_like(delta),
        None,
        [prob.x, None, prob.seg_offsets, prob.lora_a, prob.lora_b, prob.router, None, None, prob.expert_mask],
        probs,
        idx,
        2,
        1.5,
        "embedding",
        "reference",
    )
    torch.library.opcheck(torch.ops.fedamole.mole_lora_bwd.default, no_shared)


def test_torch_compile_of_the_op_matches_eager():
    prob = make_problem([4, 3], 3, 2, 8, 6, 2, ["111", "110"]).cast(torch.float32)

    def fn(x, a, b, r):
        delta, probs, _ = mole_lora(
            x, prob.seg_offsets, a, b, r, prob.shared_a, prob.shared_b, prob.expert_mask, top_k=2, scaling=1.5
        )
        return (delta**2).sum() + probs.sum()

    args = (prob.x, prob.lora_a, prob.lora_b, prob.router)
    eager = fn(*args)
    g_eager = torch.autograd.grad(eager, args)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    g_comp = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_seg_offsets_none_means_one_segment():
    prob = make_problem([5], 3, 2, 4, 3, 2, None).cast(torch.float64, requires_grad=False)
    with_none = mole_lora(**prob.kwargs(seg_offsets=None))
    explicit = mole_lora(**prob.kwargs())
    for a, b in zip(with_none, explicit):
        assert torch.equal(a, b)


def test_backend_selection(monkeypatch):
    assert "reference" in available_backends()
    assert available_backends("cpu")[-1] == "reference" or "reference" in available_backends("cpu")
    prob = make_problem([3], 2, 2, 4, 3, 1, None).cast(torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="backend"):
        mole_lora(**prob.kwargs(), backend="nope")
    monkeypatch.setenv("FEDAMOLE_BACKEND", "nope")
    with pytest.raises(ValueError, match="FEDAMOLE_BACKEND"):
        mole_lora(**prob.kwargs())
    monkeypatch.setenv("FEDAMOLE_BACKEND", "reference")
    mole_lora(**prob.kwargs())
