"""One parity suite: every backend x case x dtype against the reference, through the public `mole_lora` only.

Backends come from `available_backends("cpu")` (with the Triton interpreter switched on, so "triton" runs on CPU)
and, where a GPU is present, `available_backends("cuda")` (those cases are marked `gpu`; without a GPU they are
collected for the backends a GPU build would have and skipped). The dtypes each backend runs are in
BACKEND_DTYPES: adding a backend is one line there (a backend missing from it runs every dtype).

What is compared and the tolerance table (relative to the reference's own error against float64) are described
in tests/parity.py. Backend-specific tests (forced CPU weight-gradient strategies, thread determinism, Triton
sm_90 compilation, ...) live in tests/test_backend_cpu_specifics.py and tests/test_backend_triton_specifics.py.
"""

from __future__ import annotations

import pytest
import torch

from fedamole_kernels import available_backends, mole_lora

from parity import CASES, GPU_CASES, Case, check_parity, make_inputs, output_grads, run

BACKEND_DTYPES = {
    "cpu": ("fp32", "bf16", "fp16", "fp64"),
    "triton": ("fp32", "bf16", "fp16", "fp64"),  # fp64 falls back to the reference
    "cuda": ("fp32", "bf16", "fp16"),  # no fp64 kernels
}
ALL_DTYPES = ("fp32", "bf16", "fp16", "fp64")
# The Triton interpreter costs 1-15 s per check on a 2-core machine: there every case but INTERPRETER_SKIPS runs in
# fp32 and INTERPRETER_ALL_DTYPE_CASES in every dtype (on a GPU, every case runs in every dtype).
INTERPRETER_ALL_DTYPE_CASES = ("basic", "odd_sizes", "k_above_e_masked", "empty_segments")
INTERPRETER_SKIPS = ("many_tokens",)


def _backends(device: str) -> list[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1" if device == "cpu" else "0")
        if device == "cuda" and not torch.cuda.is_available():
            return ["triton", "cuda"]  # collected, then skipped (gpu marker)
        return [name for name in available_backends(device) if name != "reference"]


def _params() -> list:
    """device x case x dtype x backend, the backend innermost so that consecutive tests share the cached reference."""
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        backends = _backends(device)
        for case_name in {**CASES, **GPU_CASES} if device == "cuda" else CASES:
            for dtype in ALL_DTYPES:
                for backend in backends:
                    if dtype not in BACKEND_DTYPES.get(backend, ALL_DTYPES):
                        continue
                    interpreted = backend == "triton" and device == "cpu"
                    if interpreted and (
                        case_name in INTERPRETER_SKIPS
                        or (dtype != "fp32" and case_name not in INTERPRETER_ALL_DTYPE_CASES)
                    ):
                        continue
                    pid = f"{device}-{backend}-{case_name}-{dtype}"
                    params.append(pytest.param(device, backend, case_name, dtype, marks=marks, id=pid))
    return params


@pytest.fixture
def triton_mode(monkeypatch, request):
    """Triton runs interpreted on CPU and compiled on a GPU; other test modules keep their own setting."""
    device = request.node.callspec.params["device"]
    monkeypatch.setenv("TRITON_INTERPRET", "1" if device == "cpu" else "0")


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("device,backend,case_name,dtype", _params())
def test_matches_reference(device, backend, case_name, dtype):
    case = {**CASES, **GPU_CASES}[case_name]
    check_parity(backend, case, dtype, device)


def _semantic_params() -> list:
    out = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        out += [pytest.param(device, b, marks=marks, id=f"{device}-{b}") for b in _backends(device)]
    return out


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("device,backend", _semantic_params())
def test_ties_pick_lowest_active_index(device, backend):
    # Identical linear-router rows on integer-valued inputs give exactly equal logits in any summation order: the
    # top-k must be the lowest active slots (the kernels' rule; the reference's torch.topk does not promise it).
    x = torch.randint(-3, 4, (5, 19), device=device).float()
    router = torch.randint(-3, 4, (1, 1, 19), device=device).float().expand(1, 5, 19).contiguous()
    a, b = torch.randn(1, 5, 4, 19, device=device), torch.randn(1, 5, 11, 4, device=device)
    mask = torch.tensor([[False, True, True, False, True]], device=device)
    _, probs, idx = mole_lora(x, None, a, b, router, expert_mask=mask, router_type="linear", backend=backend)
    assert (idx.cpu() == torch.tensor([1, 2])).all()
    torch.testing.assert_close(probs[0].cpu(), torch.tensor([0, 1 / 3, 1 / 3, 0, 1 / 3]))


@pytest.mark.usefixtures("triton_mode")
@pytest.mark.parametrize("device,backend", _semantic_params())
def test_topk_padding_and_all_masked_segment(device, backend):
    case = Case((3, 4), experts=3, mask=("000", "010"))
    out = run(backend, case, make_inputs(case), torch.float32, device, output_grads(case, device))
    idx, probs = out["topk_idx"].cpu(), out["probs"].cpu()
    assert (idx[:3] == -1).all() and (probs[:3] == 0).all()
    assert (idx[3:, 0] == 1).all() and (idx[3:, 1] == -1).all()
    assert (probs[3:, 1] == 1).all()
