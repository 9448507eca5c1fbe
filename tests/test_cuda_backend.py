"""Backend "cuda" (CUDA kernels of the extension) against the reference. Needs a GPU: every test is gpu-marked."""

from __future__ import annotations

import pytest
import torch

from fedamole_kernels import HAS_CUDA_EXT, mole_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAS_CUDA_EXT, reason="extension built without CUDA"),
]

FLOAT_INPUTS = ("x", "expert_input", "lora_a", "lora_b", "router", "shared_a", "shared_b")


def make_inputs(
    seg_sizes,
    num_slots=6,
    rank=16,
    d_in=96,
    d_out=80,
    router_type="embedding",
    shared=True,
    expert_input=False,
    mask=None,
    dtype=torch.float32,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    num_segments, num_tokens = len(seg_sizes), sum(seg_sizes)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    rows = rank if router_type == "embedding" else num_slots
    inputs = {
        "x": rand(num_tokens, d_in),
        "lora_a": rand(num_segments, num_slots, rank, d_in, scale=d_in**-0.5),
        "lora_b": rand(num_segments, num_slots, d_out, rank, scale=rank**-0.5),
        "router": rand(num_segments, rows, d_in, scale=d_in**-0.5),
        "shared_a": rand(num_segments, rank, d_in, scale=d_in**-0.5) if shared else None,
        "shared_b": rand(num_segments, d_out, rank, scale=rank**-0.5) if shared else None,
        "expert_input": rand(num_tokens, d_in) if expert_input else None,
    }
    inputs = {k: None if v is None else v.to("cuda", dtype) for k, v in inputs.items()}
    offsets = torch.tensor([0, *torch.tensor(seg_sizes).cumsum(0).tolist()], dtype=torch.int64, device="cuda")
    if mask is not None:
        mask = torch.tensor(mask, dtype=torch.bool, device="cuda")
    return inputs, offsets, mask


def run(backend, inputs, offsets, mask, top_k, router_type):
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
        scaling=2.0,
        router_type=router_type,
        backend=backend,
    )
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = (delta.float() * torch.randn(delta.shape, generator=g, device="cuda")).sum()
    loss = loss + (probs * torch.randn(probs.shape, generator=g, device="cuda")).sum()
    names = sorted(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return delta.detach(), probs.detach(), idx, dict(zip(names, grads))


def close(actual, expected, rtol, atol_scale, what):
    atol = atol_scale * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


CASES = {
    "single": dict(seg_sizes=[300]),
    "segments_empty_masked": dict(
        seg_sizes=[70, 0, 129, 1], mask=[[1] * 6, [1] * 6, [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]
    ),
    "all_masked": dict(seg_sizes=[17, 20], mask=[[0] * 6, [1] * 6]),
    "expert_input_no_shared": dict(seg_sizes=[50, 77], expert_input=True, shared=False),
    "odd_dims": dict(seg_sizes=[33], num_slots=3, rank=5, d_in=37, d_out=23),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router_type", ["embedding", "linear"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_matches_reference(case, router_type, dtype):
    inputs, offsets, mask = make_inputs(router_type=router_type, dtype=dtype, **CASES[case])
    ref = run("reference", inputs, offsets, mask, 2, router_type)
    out = run("cuda", inputs, offsets, mask, 2, router_type)
    tight = dtype == torch.float32
    rtol, atol = (1e-4, 1e-4) if tight else (3e-2, 3e-2)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    close(out[1], ref[1], 1e-4 if tight else 1e-2, 1e-5 if tight else 1e-2, "probs")
    if tight:
        assert torch.equal(out[2], ref[2])
    else:  # fp32 accumulation order may flip near-ties on low-precision inputs: compare where the routes agree
        assert (out[2] == ref[2]).float().mean() > 0.98
    close(out[0], ref[0], rtol, atol, "delta")
    for name in ref[3]:
        assert out[3][name].dtype == dtype
        close(out[3][name], ref[3][name], rtol, atol, f"grad {name}")


def test_cuda_route_counts_match_topk():
    from fedamole_kernels.cuda_mole_lora import mole_route

    inputs, offsets, mask = make_inputs([64, 0, 40], mask=[[1] * 6, [1] * 6, [0, 1, 1, 1, 0, 1]])
    probs, idx, counts = mole_route(inputs["x"], offsets, inputs["lora_a"], inputs["router"], mask, 2)
    _, ref_probs, ref_idx = mole_lora(
        inputs["x"],
        offsets,
        inputs["lora_a"],
        inputs["lora_b"],
        inputs["router"],
        expert_mask=mask,
        backend="reference",
    )
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-4, atol=1e-6)
    bounds = offsets.tolist()
    for s in range(3):
        seg = idx[bounds[s] : bounds[s + 1]].flatten()
        assert torch.equal(counts[s], torch.bincount(seg[seg >= 0], minlength=6))


def test_cuda_large_bf16_runs():
    # GPU-sized shapes (d = 1024, r = 16, 8 slots, several clients), compared with the reference loosely.
    inputs, offsets, _ = make_inputs(
        [512, 256, 1024], num_slots=8, rank=16, d_in=1024, d_out=1024, dtype=torch.bfloat16
    )
    ref = run("reference", inputs, offsets, None, 2, "embedding")
    out = run("cuda", inputs, offsets, None, 2, "embedding")
    close(out[0], ref[0], 5e-2, 3e-2, "delta")
    for name in ref[3]:
        close(out[3][name], ref[3][name], 5e-2, 3e-2, f"grad {name}")
