"""Bad input to `mole_lora` raises ValueError/TypeError naming the argument."""

import math

import pytest
import torch

from fedamole_kernels import mole_lora
from fedamole_kernels.problem import MoLEProblem

from mole_cases import make_problem


@pytest.fixture
def prob():
    return make_problem([3, 2], 3, 2, 4, 5, 2, ["111", "011"], expert_input=True).cast(
        torch.float32, requires_grad=False
    )


def _call(prob, **overrides):
    return mole_lora(**prob.kwargs(**overrides), backend="reference")


BAD = [
    # (overrides as a function of the problem, exception type, argument name in the message)
    (lambda p: dict(x=p.x[None]), ValueError, "x"),
    (lambda p: dict(x=p.x.long()), TypeError, "x"),
    (lambda p: dict(x=p.x.tolist()), TypeError, "x"),
    (lambda p: dict(lora_a=p.lora_a[..., :3]), ValueError, "lora_a"),
    (lambda p: dict(lora_a=p.lora_a[0]), ValueError, "lora_a"),
    (lambda p: dict(lora_a=p.lora_a.double()), TypeError, "lora_a"),
    (lambda p: dict(lora_b=p.lora_b[:, :2]), ValueError, "lora_b"),
    (lambda p: dict(lora_b=p.lora_b[..., :1]), ValueError, "lora_b"),
    (lambda p: dict(lora_b=p.lora_b.half()), TypeError, "lora_b"),
    (lambda p: dict(router=p.router[:, :1]), ValueError, "router"),
    (lambda p: dict(router_type="linear"), ValueError, "router"),
    (lambda p: dict(router_type="softmax"), ValueError, "router_type"),
    (lambda p: dict(shared_a=None), ValueError, "shared_a"),
    (lambda p: dict(shared_b=p.shared_b[:, :3]), ValueError, "shared_b"),
    (lambda p: dict(shared_a=p.shared_a.transpose(1, 2)), ValueError, "shared_a"),
    (lambda p: dict(expert_mask=p.expert_mask.int()), TypeError, "expert_mask"),
    (lambda p: dict(expert_mask=p.expert_mask[:, :2]), ValueError, "expert_mask"),
    (lambda p: dict(expert_input=p.expert_input[:3]), ValueError, "expert_input"),
    (lambda p: dict(expert_input=p.expert_input.half()), TypeError, "expert_input"),
    (lambda p: dict(seg_offsets=p.seg_offsets.float()), TypeError, "seg_offsets"),
    (lambda p: dict(seg_offsets=torch.tensor([0, 5])), ValueError, "seg_offsets"),
    (lambda p: dict(seg_offsets=torch.tensor([1, 3, 5])), ValueError, "start at 0"),
    (lambda p: dict(seg_offsets=torch.tensor([0, 3, 4])), ValueError, "end at T"),
    (lambda p: dict(seg_offsets=torch.tensor([0, 4, 9])), ValueError, "end at T"),
    (lambda p: dict(seg_offsets=torch.tensor([0, 6, 5])), ValueError, "non-decreasing"),
    (lambda p: dict(seg_offsets=torch.tensor([0, -1, 5])), ValueError, "non-decreasing"),
    (lambda p: dict(top_k=0), ValueError, "top_k"),
    (lambda p: dict(top_k=-3), ValueError, "top_k"),
    (lambda p: dict(top_k=2.0), TypeError, "top_k"),
    (lambda p: dict(top_k=10**12), ValueError, "top_k"),
    (lambda p: dict(x=p.x[:, :0], lora_a=p.lora_a[..., :0]), ValueError, "d_in"),
    (lambda p: dict(top_k=True), TypeError, "top_k"),
    (lambda p: dict(scaling=math.nan), ValueError, "scaling"),
    (lambda p: dict(scaling=math.inf), ValueError, "scaling"),
    (lambda p: dict(scaling="2"), TypeError, "scaling"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_the_argument(prob, case):
    make_overrides, exc, needle = BAD[case]
    with pytest.raises(exc, match=needle):
        _call(prob, **make_overrides(prob))


def test_device_mismatch_names_the_argument(prob):
    meta_offsets = prob.seg_offsets.to("meta")
    with pytest.raises(ValueError, match="seg_offsets"):
        _call(prob, seg_offsets=meta_offsets)


def test_huge_top_k_is_fine(prob):
    delta, probs, idx = _call(prob, top_k=50)
    assert idx.shape == (5, 50)
    assert (idx[:, 3:] == -1).all()


def test_valid_input_still_runs(prob):
    delta, probs, idx = _call(prob)
    assert delta.shape == (5, 5) and probs.shape == (5, 3) and idx.shape == (5, 2)


VALUE_CHECKS = ("start at 0", "end at T", "non-decreasing")


@pytest.mark.parametrize("case", [i for i, (_, _, needle) in enumerate(BAD) if needle not in VALUE_CHECKS])
def test_launcher_checks_reject_what_the_api_rejects(prob, case):
    """`MoLEProblem.check_launch` (the Triton launchers' fast path) never accepts what `validate` rejects."""
    make_overrides, exc, needle = BAD[case]
    kwargs = prob.kwargs(**make_overrides(prob))
    with pytest.raises(exc, match=needle):
        _check_launch(kwargs)


LAUNCH_ARGS = (
    "x",
    "seg_offsets",
    "lora_a",
    "lora_b",
    "router",
    "shared_a",
    "shared_b",
    "expert_mask",
    "expert_input",
    "top_k",
    "scaling",
    "router_type",
)


def _check_launch(kwargs: dict) -> None:
    MoLEProblem(**{n: kwargs[n] for n in LAUNCH_ARGS}).check_launch()


def test_launcher_checks_accept_valid_input(prob):
    _check_launch(prob.kwargs())
    _check_launch(prob.kwargs(shared_a=None, shared_b=None, expert_input=None))
