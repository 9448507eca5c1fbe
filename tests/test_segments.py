"""`use_segments`: one call over many clients' rows, each client with its own (caller-owned) stacked weights,
equals one layer per client — outputs, per-client load balance and every gradient — for any rows per client."""

import pytest
import torch
from torch import nn

from fedamole import MoLEConfig, MoLELinear, load_balance_from_routing, record_routing
from fedamole.segments import ClientWeights, SegmentPlan, use_segments

KINDS = ("lora_a", "lora_b", "router", "shared_a", "shared_b")


def _clients(num, router="embedding", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10).double()  # float64: the comparisons below are exact up to rounding
    layers = []
    for s in range(num):
        layer = MoLELinear(base, MoLEConfig(num_experts=4, rank=3, top_k=2, dropout=0.0, router=router))
        with torch.no_grad():
            layer.lora_b.normal_()
            layer.shared_b.normal_()
        mask = torch.zeros(4, dtype=torch.bool)
        mask[: 1 + (s % 4)] = True
        layer.set_active_experts(mask)
        layers.append(layer)
    return layers


def _stack(layers):
    leaves = {k: nn.Parameter(torch.stack([getattr(m, k).detach() for m in layers])) for k in KINDS}
    active = torch.stack([m.active_experts for m in layers])
    return leaves, ClientWeights(**leaves, active=active)


@pytest.mark.parametrize("router", ["embedding", "linear"])
@pytest.mark.parametrize("rows", [[2, 1, 3], [0, 4, 1], [1], [3, 0, 0], [5, 2, 0, 1]])
def test_segments_equal_one_layer_per_client(rows, router):
    layers = _clients(len(rows), router)
    leaves, weights = _stack(layers)
    holder = MoLELinear(layers[0].base, layers[0].config)
    plan = SegmentPlan.from_counts(rows)
    x = torch.randn(sum(rows), 5, 12, dtype=torch.float64)
    mask = torch.rand(sum(rows), 5) > 0.3
    with use_segments(holder, {"": weights}, plan), record_routing(holder) as routing:
        y = holder(x)
    lb = routing.load_balance_loss(token_mask=mask, per_client=True)
    assert holder._segment is None, "the plan must be gone after the block"
    (y.pow(2).sum() + lb.sum()).backward()
    for s, layer in enumerate(layers):
        part = plan.rows(s)
        with record_routing(layer) as own:
            out = layer(x[part])
        own_lb = own.load_balance_loss(token_mask=mask[part])
        torch.testing.assert_close(y[part], out)
        torch.testing.assert_close(lb[s], own_lb)
        (out.pow(2).sum() + own_lb).backward()
        for kind in KINDS:
            torch.testing.assert_close(leaves[kind].grad[s], getattr(layer, kind).grad, msg=f"{kind} of client {s}")
    assert all(holder.lora_a.grad is None for _ in [0]), "the holder's own parameters must not be used"


def test_load_balance_offsets_match_separate_calls():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(9, 4, dtype=torch.float64), -1)
    idx = probs.topk(2, -1).indices
    idx[3, 1] = -1
    active = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    offsets = torch.tensor([0, 4, 4, 9])
    per_client = load_balance_from_routing(probs, idx, active, per_client=True, offsets=offsets)
    expected = [
        load_balance_from_routing(probs[a:b], idx[a:b], active[s]) for s, (a, b) in enumerate([(0, 4), (4, 4), (4, 9)])
    ]
    torch.testing.assert_close(per_client, torch.stack(expected))
    assert per_client[1] == 0
    with pytest.raises(ValueError, match="offsets"):
        load_balance_from_routing(probs, idx, active)
    with pytest.raises(ValueError, match="offsets"):
        load_balance_from_routing(probs, idx, active, offsets=offsets[:3])


def test_plan_and_weights_errors_name_the_problem():
    with pytest.raises(ValueError, match="row_offsets"):
        SegmentPlan([0, 3, 2])
    with pytest.raises(ValueError, match="row_offsets"):
        SegmentPlan([1, 3])
    with pytest.raises(ValueError, match="rows_per_client"):
        SegmentPlan.from_counts([2, -1])
    layers = _clients(2)
    _, weights = _stack(layers)
    holder = MoLELinear(layers[0].base, layers[0].config)
    with pytest.raises(ValueError, match="missing"):
        with use_segments(holder, {}, SegmentPlan([0, 1, 2])):
            pass
    with pytest.raises(ValueError, match="S = 3"):
        with use_segments(holder, {"": weights}, SegmentPlan([0, 1, 2, 3])):
            pass
    with use_segments(holder, {"": weights}, SegmentPlan([0, 1, 3])):
        with pytest.raises(ValueError, match="rows"):
            holder(torch.randn(4, 2, 12, dtype=torch.float64))
    bad = ClientWeights(**{**weights.__dict__, "lora_b": weights.lora_b[:, :, :3]})
    with pytest.raises(ValueError, match="lora_b"):
        with use_segments(holder, {"": bad}, SegmentPlan([0, 1, 3])):
            pass


def test_stacked_parameters_without_a_plan_raise():
    layer = _clients(1)[0]
    layer.lora_a = nn.Parameter(layer.lora_a.detach()[None].expand(2, -1, -1, -1).clone())
    with pytest.raises(ValueError, match="use_segments"):
        layer(torch.randn(2, 12, dtype=torch.float64))


def test_extra_module_runs_per_client_with_its_stacked_parameters():
    torch.manual_seed(2)
    layers = _clients(2)
    holder = nn.Sequential()
    holder.add_module("mole", MoLELinear(layers[0].base, layers[0].config))
    holder.add_module("head", nn.Linear(10, 3))
    heads = [nn.Linear(10, 3) for _ in layers]
    stacked = {k: torch.stack([getattr(h, k).detach() for h in heads]) for k in ("weight", "bias")}
    _, weights = _stack(layers)
    holder.double()
    heads = [h.double() for h in heads]
    stacked = {k: v.double() for k, v in stacked.items()}
    x = torch.randn(5, 12, dtype=torch.float64)
    with use_segments(holder, {"mole": weights}, SegmentPlan([0, 2, 5]), extra={"head": stacked}):
        y = holder(x)
    torch.testing.assert_close(y[:2], heads[0](layers[0](x[:2])))
    torch.testing.assert_close(y[2:], heads[1](layers[1](x[2:])))
