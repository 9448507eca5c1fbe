"""MoLELinear: drop-in behaviour, initialisation, dropout placement, masks, load balance, dtypes, compile."""

import math

import pytest
import torch
from torch import nn

from fedamole import MoLEConfig, MoLELinear, load_balance_from_routing, record_routing
from fedamole_kernels import mole_lora


def _layer(**cfg):
    torch.manual_seed(0)
    return MoLELinear(nn.Linear(12, 10), MoLEConfig(**{"num_experts": 4, **cfg}))


def test_initialised_layer_equals_the_base_linear():
    layer = _layer()
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert layer(x).shape == (2, 7, 10)
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.shared_b) == 0
    assert torch.count_nonzero(layer.lora_a) == layer.lora_a.numel()
    assert not torch.equal(layer.lora_a[0], layer.lora_a[1]), "experts must be initialised independently"
    bound = 1.0 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in = d_in
    assert layer.lora_a.abs().max() <= bound


def test_base_is_frozen_and_experts_train():
    layer = _layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b", "router", "shared_a", "shared_b"}
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.shared_b.normal_()
    layer(torch.randn(5, 12)).pow(2).sum().backward()
    assert layer.base.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in layer.named_parameters() if n in trainable)


def test_forward_equals_the_functional_op():
    layer = _layer(dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.shared_b.normal_()
    x = torch.randn(6, 12)
    delta, _, _ = mole_lora(
        x,
        None,
        layer.lora_a[None],
        layer.lora_b[None],
        layer.router[None],
        layer.shared_a[None],
        layer.shared_b[None],
        None,
        None,
        top_k=2,
        scaling=2.0,
    )
    torch.testing.assert_close(layer(x), layer.base(x) + delta)


def test_dropout_feeds_the_experts_only():
    layer = _layer(dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(64, 12)
    layer.eval()
    with record_routing(layer) as routing:
        y_eval = layer(x)
    probs_eval = routing.calls[0].probs
    layer.train()
    with record_routing(layer) as routing:
        y_train = layer(x)
    torch.testing.assert_close(routing.calls[0].probs, probs_eval, rtol=0, atol=0)  # routing saw the clean input
    assert not torch.allclose(y_train, y_eval)


def test_active_experts_mask():
    layer = _layer(dropout=0.0)
    layer.set_active_experts(torch.tensor([True, False, True, False]))
    with record_routing(layer) as routing:
        layer(torch.randn(9, 12))
    (call,) = routing.calls
    assert (call.probs[:, [1, 3]] == 0).all()
    assert set(call.topk_idx.unique().tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="mask"):
        layer.set_active_experts(torch.ones(3, dtype=torch.bool))


def test_load_balance_loss_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0], [0.5, 0.1, 0.4, 0.0]])
    idx = torch.tensor([[0, 1], [1, 2], [0, -1]])
    active = torch.tensor([True, True, True, False])
    mean_p = probs.mean(0)
    share = torch.tensor([2, 2, 1, 0]) / 5.0
    expected = 3 * (mean_p * share).sum()
    torch.testing.assert_close(load_balance_from_routing(probs, idx, active), expected)
    assert load_balance_from_routing(probs[:0], idx[:0], active).item() == 0.0


def test_load_balance_loss_is_differentiable():
    layer = _layer()
    with record_routing(layer) as routing:
        layer(torch.randn(8, 12))
    routing.load_balance_loss().backward()
    assert layer.router.grad.abs().sum() > 0 and layer.lora_a.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(dtype):
    layer = _layer(dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 12)
    ref = layer(x)
    low = MoLELinear(nn.Linear(12, 10).to(dtype), layer.config)
    low.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    y = low(x.to(dtype))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    y.float().sum().backward()
    assert low.lora_a.grad.dtype == dtype


def test_fp32_experts_on_a_bf16_backbone():
    layer = MoLELinear(nn.Linear(12, 10).bfloat16(), MoLEConfig(num_experts=3, dropout=0.0), dtype=torch.float32)
    assert layer.lora_a.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    y = layer(torch.randn(3, 12).bfloat16())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_b.grad.dtype == torch.float32


@pytest.mark.parametrize("router", ["embedding", "linear"])
def test_torch_compile_matches_eager(router):
    layer = _layer(router=router, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.shared_b.normal_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    with record_routing(layer) as routing:
        eager = layer(x)
    g_eager = torch.autograd.grad(eager.pow(2).sum() + routing.load_balance_loss(), [x, layer.lora_a, layer.router])
    compiled_layer = torch.compile(layer, fullgraph=True)
    with record_routing(layer) as routing:
        comp = compiled_layer(x)
    g_comp = torch.autograd.grad(comp.pow(2).sum() + routing.load_balance_loss(), [x, layer.lora_a, layer.router])
    torch.testing.assert_close(comp, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="base"):
        MoLELinear(nn.Conv1d(3, 3, 1), MoLEConfig())
    with pytest.raises(TypeError, match="config"):
        MoLELinear(nn.Linear(3, 3), {"num_experts": 2})
    with pytest.raises(ValueError, match="in_features"):
        _layer()(torch.randn(3, 11))


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_experts", 0),
        ("rank", -1),
        ("top_k", 1.5),
        ("alpha", float("nan")),
        ("dropout", 1.0),
        ("router", "mlp"),
        ("shared_expert", "yes"),
        ("target_modules", []),
        ("load_balance_coef", -1.0),
        ("backend", "gpu"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoLEConfig(**{field: value})


def test_config_round_trip():
    config = MoLEConfig(num_experts=3, target_modules="q_proj, v_proj", router="linear")
    assert config.target_modules == ("q_proj", "v_proj")
    assert MoLEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        MoLEConfig.from_dict({"num_expert": 3})


def test_load_balance_token_mask_ignores_padding():
    probs = torch.softmax(torch.randn(6, 3), -1)
    idx = probs.topk(2, -1).indices
    active = torch.ones(3, dtype=torch.bool)
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    masked = load_balance_from_routing(probs, idx, active, token_mask=mask)
    torch.testing.assert_close(masked, load_balance_from_routing(probs[:4], idx[:4], active))
    with pytest.raises(ValueError, match="token_mask"):
        load_balance_from_routing(probs, idx, active, token_mask=mask[:5])
