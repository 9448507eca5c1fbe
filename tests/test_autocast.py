"""MoLELinear under torch.autocast: nn.Linear's dtype semantics, values close to the fp32 computation, gradients.

Under autocast the layer runs the op in the autocast dtype (x and the expert weights cast to it, as nn.Linear casts
its input and weight); the kernels accumulate in fp32 and keep `probs` fp32. The expected values are computed in fp32
(backend "reference", no autocast) from the inputs rounded to the autocast dtype, the rounding autocast itself
applies, so only the kernels' own rounding is left for the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedamole
from fedamole import MoLEConfig, MoLELinear
from fedamole.layers import MoLEExperts
from fedamole_kernels import available_backends, mole_lora

D_IN, D_OUT, TOKENS = 24, 20, 11
# Max abs error allowed, relative to the output's max abs: a few bf16/fp16 roundings (2^-8 / 2^-11) of O(1) terms.
# The same bound holds for the gradients (measured worst cases: 23% of it for outputs and for gradients).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

CPU_BACKENDS = available_backends("cpu")
# (base weight dtype, expert dtype): fp32 everywhere, bf16 experts on an fp32 base, bf16 everywhere, fp32 experts
# on a bf16 backbone.
WEIGHTS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
INPUTS = [torch.float32, torch.bfloat16, torch.float16]


def make_layer(base_dtype, expert_dtype, backend, device="cpu", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(device=device, dtype=base_dtype)
    config = MoLEConfig(num_experts=4, rank=4, top_k=2, dropout=0.0, backend=backend)
    layer = MoLELinear(base, config, dtype=expert_dtype).train()
    with torch.no_grad():
        # LoRA's B starts at zero: make the experts' delta dominate the output, so that dropping or mis-scaling it
        # under autocast (tested: by 5%) cannot hide inside the tolerance.
        layer.lora_b.normal_(std=3.0)
        layer.shared_b.normal_(std=3.0)
    return layer


def fp32_expected(layer, x, cast_dtype):
    """Output, delta and gradients (x, lora_a, lora_b, router) of the loss out^2 computed in fp32 from inputs rounded
    to `cast_dtype`, independently of the layer's code: F.linear plus `mole_lora` on the reference backend."""

    def rounded(t):
        return t.detach().to(cast_dtype).float().requires_grad_()

    c = layer.config
    xr = rounded(x).reshape(-1, D_IN)
    a, b, router, sa, sb = (rounded(getattr(layer, n)) for n in ("lora_a", "lora_b", "router", "shared_a", "shared_b"))
    delta, _, _ = mole_lora(
        xr,
        None,
        a[None],
        b[None],
        router[None],
        sa[None],
        sb[None],
        top_k=c.top_k,
        scaling=c.scaling,
        router_type=c.router,
        backend="reference",
    )
    out = F.linear(xr, rounded(layer.base.weight), rounded(layer.base.bias)) + delta
    grads = torch.autograd.grad(out.pow(2).sum(), [xr, a, b, router])
    shape = (*x.shape[:-1], D_OUT)
    return out.detach().reshape(shape), delta.detach().reshape(shape), (grads[0].reshape(x.shape), *grads[1:])


def check_against_fp32(layer, x, autocast_dtype, device_type="cpu"):
    x = x.detach().requires_grad_()
    with torch.autocast(device_type, dtype=autocast_dtype):
        out = layer(x)
        reference_out = layer.base(x.detach())
    # nn.Linear's semantics under autocast: the output has the dtype the base linear gives there; so does the adapter's
    # delta on its own (MoLEExperts, as the PEFT tuner uses it).
    assert out.dtype == reference_out.dtype == autocast_dtype
    with torch.autocast(device_type, dtype=autocast_dtype), torch.no_grad():
        assert MoLEExperts.forward(layer, x).dtype == autocast_dtype
    expected, delta, expected_grads = fp32_expected(layer, x, autocast_dtype)
    scale = expected.abs().max().item()
    assert delta.abs().max().item() > 0.7 * scale, "the experts' delta must dominate the output"
    err = (out.float() - expected).abs().max().item()
    assert err <= TOLERANCE[autocast_dtype] * scale, f"max error {err:.3g} vs max |out| {scale:.3g}"

    out.float().pow(2).sum().backward()
    params = {n: getattr(layer, n) for n in ("lora_a", "lora_b", "router", "shared_a", "shared_b")}
    for name, param in params.items():
        assert param.grad is not None, name
        assert param.grad.dtype == param.dtype, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all()
    for got, want, name in zip(
        (x.grad, params["lora_a"].grad, params["lora_b"].grad, params["router"].grad),
        expected_grads,
        ("x", "lora_a", "lora_b", "router"),
    ):
        err = (got.float() - want).abs().max().item()
        limit = TOLERANCE[autocast_dtype] * want.abs().max().item()
        assert err <= limit, f"grad {name}: max error {err:.3g} > {limit:.3g}"
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: f"base_{w[0]}-experts_{w[1]}".replace("torch.", ""))
@pytest.mark.parametrize("input_dtype", INPUTS, ids=str)
def test_cpu_autocast_bf16(backend, weights, input_dtype):
    layer = make_layer(*weights, backend=backend)
    x = torch.randn(2, TOKENS, D_IN).to(input_dtype)
    check_against_fp32(layer, x, torch.bfloat16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_autocast_fp16(backend):
    layer = make_layer(torch.float32, torch.float32, backend=backend)
    check_against_fp32(layer, torch.randn(TOKENS, D_IN), torch.float16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_probs_stay_fp32_under_autocast(backend):
    layer = make_layer(torch.float32, torch.float32, backend=backend)
    with fedamole.record_routing(layer) as routing, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(TOKENS, D_IN))
    (call,) = routing.calls
    assert call.probs.dtype == torch.float32
    torch.testing.assert_close(call.probs.sum(-1), torch.ones(TOKENS))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_off_inside_is_the_plain_path(backend):
    """Autocast disabled (or for another device) changes nothing: same result as no autocast at all."""
    layer = make_layer(torch.float32, torch.float32, backend=backend)
    x = torch.randn(TOKENS, D_IN)
    plain = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert torch.equal(layer(x), plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_llama_train_step_under_autocast(backend):
    from test_models import _perturb_experts, tiny_llama

    model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=4, rank=4, backend=backend))
    _perturb_experts(model)
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    with fedamole.record_routing(model) as routing, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the base model's own autocast behaviour, untouched
    loss = out.loss + model.fedamole_config.load_balance_coef * routing.load_balance_loss()
    assert torch.isfinite(loss)
    loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weights", WEIGHTS[:3], ids=lambda w: f"base_{w[0]}-experts_{w[1]}".replace("torch.", ""))
def test_cuda_autocast(backend, autocast_dtype, weights):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available on CUDA in this build")
    layer = make_layer(*weights, backend=backend, device="cuda")
    check_against_fp32(layer, torch.randn(2, TOKENS, D_IN, device="cuda"), autocast_dtype, device_type="cuda")
