"""Issue 13, server side: no NaN leaks from one client to the next, every upload field is schema-checked (a bad one
is rejected and reported, never raised), upload norms are bounded relative to the round, runs where no client ever
works stop with the real error, and summaries are strict JSON written atomically."""

import math

import pytest
import torch
from torch import nn

import fedamole
from fedamole.fl.client import load_state
from fedamole.fl.runner import simulate
from fedamole.presets import make_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**over):
    over = {"rounds": 1, "local_steps": 2, "eval_initial": False, **over}
    return make_config("tiny", over)


# -- row 2: slots a client does not hold are zeroed when its state is loaded --------------------------------------
@pytest.mark.parametrize("router", ["embedding", "linear"])
def test_load_state_zeroes_slots_the_client_does_not_hold(router):
    model = nn.Sequential(nn.Linear(6, 5))
    fedamole.inject_mole(
        model, fedamole.MoLEConfig(num_experts=4, rank=2, top_k=2, router=router, target_modules=["0"])
    )
    module = next(iter(fedamole.mole_modules(model).values()))
    rows = 4 if router == "linear" else 2

    def state(k, fill):
        out = {"0.lora_a": torch.full((k, 2, 6), fill), "0.lora_b": torch.full((k, 5, 2), fill)}
        out["0.router"] = torch.full((k, 6) if router == "linear" else (rows, 6), fill)
        return out

    load_state(model, state(4, math.nan))  # a diverged client holding every slot
    load_state(model, state(2, 1.0))
    assert module.active_experts.tolist() == [True, True, False, False]
    slot_kinds = ("lora_a", "lora_b", "router") if router == "linear" else ("lora_a", "lora_b")
    for kind in slot_kinds:
        values = getattr(module, kind)
        assert (values[:2] == 1).all(), kind
        assert (values[2:] == 0).all(), kind
    x = torch.randn(3, 6)
    assert torch.isfinite(model(x)).all()


def test_one_diverging_client_does_not_poison_the_others():
    """Issue reproducer: 6 experts over 4 clients holding 2..4 each; client 0 diverges (its trained tensors become
    NaN) and trains first, so the next clients load their states into slots it left NaN."""
    cfg = _tiny(fedamole={"num_experts": 6}, faults=[{"round": 1, "client": 0, "kind": "diverge"}])
    entry = simulate(cfg, progress=False)["history"][0]
    assert [r["client"] for r in entry["rejected_uploads"]] == [0]
    assert any("NaN" in reason for reason in entry["rejected_uploads"][0]["reasons"])
    assert entry["participants"] == 3
