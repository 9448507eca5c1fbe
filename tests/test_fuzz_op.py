"""Property tests of `mole_lora`: random valid problems match the oracle on every backend; random invalid input
gives ValueError/TypeError; NaN input gives NaN output only where it can reach."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedamole_kernels import available_backends, mole_lora

from mole_cases import Problem, make_problem, naive_mole_lora

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, max_tokens=5):
    num_segments = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, max_tokens), min_size=num_segments, max_size=num_segments))
    num_slots = draw(st.integers(1, 5))
    masks = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.text("01", min_size=num_slots, max_size=num_slots), min_size=num_segments, max_size=num_segments
            ),
        )
    )
    return make_problem(
        lengths,
        num_slots,
        draw(st.integers(1, 4)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 7)),
        draw(st.integers(1, 6)),
        masks,
        router_type=draw(st.sampled_from(["embedding", "linear"])),
        shared=draw(st.booleans()),
        expert_input=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _outputs_and_grads(prob: Problem, backend: str):
    inputs = prob.float_inputs()
    delta, probs, idx = mole_lora(**prob.kwargs(), backend=backend)
    weights = torch.linspace(-1, 1, delta.numel(), dtype=delta.dtype).reshape(delta.shape)
    loss = (delta * weights).sum() + (probs.to(delta.dtype) ** 2).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return delta, probs, idx, dict(zip(inputs, grads))


@FUZZ
@given(problems())
def test_reference_matches_the_per_token_oracle(problem):
    prob = problem.cast(torch.float64)
    delta, probs, idx, _ = _outputs_and_grads(prob, "reference")
    n_delta, n_probs, chosen = naive_mole_lora(prob)
    torch.testing.assert_close(delta, n_delta, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(probs, n_probs, rtol=1e-9, atol=1e-9)
    assert [set(i for i in row if i >= 0) for row in idx.tolist()] == chosen


def _backend_params():
    return [pytest.param("cpu"), pytest.param("triton")]


@pytest.fixture
def use_backend(monkeypatch):
    """Returns a function that makes backend `name` usable on CPU tensors (the Triton interpreter for "triton")
    or skips the test when that backend is not built here."""

    def use(name: str) -> str:
        if name == "triton":
            pytest.importorskip("triton")
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        if name not in available_backends("cpu"):
            pytest.skip(f"backend {name!r} not available on CPU in this build")
        return name

    return use


@pytest.mark.parametrize("backend", _backend_params())
def test_backends_match_the_reference_on_random_problems(backend, use_backend):
    use_backend(backend)

    @(FUZZ if backend == "cpu" else FUZZ_SLOW)
    @given(problems(max_tokens=4))
    def check(problem):
        prob = problem.cast(torch.float32)
        ref = _outputs_and_grads(prob, "reference")
        got = _outputs_and_grads(prob, backend)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)
        assert torch.equal(got[2], ref[2])
        for name, g in ref[3].items():
            other = got[3][name]
            g = torch.zeros_like(prob.float_inputs()[name]) if g is None else g
            other = torch.zeros_like(g) if other is None else other
            torch.testing.assert_close(other, g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")

    check()


CORRUPTIONS = [
    ("x", lambda p, r: p.x.reshape(-1)),
    ("x", lambda p, r: p.x.to(torch.int32)),
    ("lora_a", lambda p, r: p.lora_a[..., : max(p.lora_a.shape[-1] - 1, 0)]),
    ("lora_a", lambda p, r: p.lora_a.unsqueeze(0)),
    ("lora_b", lambda p, r: torch.cat([p.lora_b, p.lora_b], dim=3)),
    ("router", lambda p, r: p.router[:, :0]),
    ("seg_offsets", lambda p, r: p.seg_offsets.flip(0) if p.x.shape[0] else p.seg_offsets + 1),
    ("seg_offsets", lambda p, r: p.seg_offsets - r.randint(1, 5)),
    ("seg_offsets", lambda p, r: p.seg_offsets + torch.arange(p.seg_offsets.numel()) * r.randint(1, 5)),
    ("seg_offsets", lambda p, r: p.seg_offsets[:-1]),
    ("seg_offsets", lambda p, r: p.seg_offsets.double()),
    ("expert_mask", lambda p, r: torch.ones(p.lora_a.shape[0], p.lora_a.shape[1] + 1, dtype=torch.bool)),
    ("expert_mask", lambda p, r: torch.ones(p.lora_a.shape[:2], dtype=torch.float32)),
    ("top_k", lambda p, r: -r.randint(0, 10**6)),
    ("top_k", lambda p, r: 10**9),
    ("scaling", lambda p, r: r.choice([math.nan, math.inf, -math.inf])),
]


@pytest.mark.parametrize("backend", ["reference", *_backend_params()])
def test_random_invalid_inputs_raise_naming_the_argument(backend, use_backend):
    use_backend(backend)

    @FUZZ
    @given(problems(), st.integers(0, len(CORRUPTIONS) - 1), st.randoms(use_true_random=False))
    def check(problem, which, rng):
        prob = problem.cast(torch.float32, requires_grad=False)
        name, corrupt = CORRUPTIONS[which]
        bad = corrupt(prob, rng)
        with pytest.raises((ValueError, TypeError), match=name):
            mole_lora(**prob.kwargs(**{name: bad}), backend=backend)

    check()


@pytest.mark.parametrize("backend", ["reference", *_backend_params()])
def test_nan_inputs_give_nan_outputs_where_they_reach(backend, use_backend):
    use_backend(backend)
    prob = make_problem([4, 3], 3, 2, 6, 5, 2, None).cast(torch.float32, requires_grad=False)
    x = prob.x.clone()
    x[1, 2] = float("nan")
    delta, probs, idx = mole_lora(**prob.kwargs(x=x), backend=backend)
    assert torch.isnan(delta[1]).all() and torch.isnan(probs[1]).all()
    rows = [0, 2, 3, 4, 5, 6]
    assert torch.isfinite(delta[rows]).all() and torch.isfinite(probs[rows]).all()
    assert ((idx >= -1) & (idx < 3)).all()
    lora_b = prob.lora_b.clone()
    lora_b[1] = float("inf")
    delta, _, _ = mole_lora(**prob.kwargs(lora_b=lora_b), backend=backend)
    assert torch.isfinite(delta[:4]).all(), "segment 0 never reads segment 1's experts"


@pytest.mark.parametrize("backend", ["reference", *_backend_params()])
def test_zero_tokens(backend, use_backend):
    use_backend(backend)
    prob = make_problem([0, 0], 3, 2, 4, 5, 2, None).cast(torch.float32)
    delta, probs, idx = mole_lora(**prob.kwargs(), backend=backend)
    assert delta.shape == (0, 5) and probs.shape == (0, 3) and idx.shape == (0, 2)
    delta.sum().backward()
    assert prob.lora_a.grad is not None and (prob.lora_a.grad == 0).all()
