"""The authors' data protocol (SPEC §3): BOS, max length with long prompts dropped, SNLI as they set it up, candidate
EOS, the balanced Dirichlet partition, the Natural Instructions task choice, and the paper presets' defaults."""

import json
from collections import Counter

import numpy as np
import pytest

from fedamole.data import (
    SNLI_CHOICES,
    ClientData,
    Example,
    Scenario,
    dirichlet_partition,
    drop_long_prompts,
    load_natural_instructions,
    load_snli,
    prompt_ids,
    snli_split_fractions,
    split_fractions,
    task_partition,
)
from fedamole.simulation.presets import (
    PRESETS,
    ByteTokenizer,
    build_data,
    build_workload,
    make_algorithm,
    make_config,
    mole_config,
)


def _tiny_workload(**model):
    cfg = make_config("tiny", {"model": model} if model else None)
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    return cfg, scenario, build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)


class _NoBos(ByteTokenizer):
    bos_token_id = None


def test_prompt_ids_start_with_bos_when_the_tokenizer_has_one():
    tok = ByteTokenizer()
    assert prompt_ids(tok, "ab") == [tok.bos_token_id, ord("a") + 3, ord("b") + 3]
    assert prompt_ids(tok, "ab", add_bos=False) == [ord("a") + 3, ord("b") + 3]
    assert prompt_ids(_NoBos(), "ab") == [ord("a") + 3, ord("b") + 3]


def test_workload_pairs_keep_the_prompt_and_cut_the_response_to_eos():
    _, _, wl = _tiny_workload(max_length=12)
    ids, labels = wl._pair("abc", "xyz")
    assert ids[0] == ByteTokenizer.bos_token_id and len(ids) == 1 + 3 + 3 + 1
    assert labels[:4] == [-100] * 4 and ids[-1] == wl.eos_id
    ids, labels = wl._pair("abcdefgh", "0123456789")  # 9 prompt tokens: 3 left for the response, the last EOS
    assert len(ids) == 12 and ids[:9] == prompt_ids(ByteTokenizer(), "abcdefgh")
    assert ids[9:] == [ord("0") + 3, ord("1") + 3, wl.eos_id] and labels[9:] == ids[9:]
    _, _, no_bos = _tiny_workload(max_length=12, add_bos=False)
    assert no_bos._pair("abc", "x")[0][0] == ord("a") + 3


def test_generation_prompt_starts_with_bos():
    _, _, wl = _tiny_workload()
    seen = []
    original = wl.model.generate

    def spy(input_ids, **kw):
        seen.append(input_ids[0].tolist())
        return original(input_ids=input_ids, **kw)

    wl.model.generate = spy
    wl.max_new_tokens = 1
    wl.generate(["ab"])
    assert seen[0][0] == ByteTokenizer.bos_token_id


def test_candidates_are_scored_followed_by_eos():
    cfg, scenario, wl = _tiny_workload()
    assert wl.candidate_eos is True and cfg.data.get("candidate_eos", True)
    examples = scenario.clients[0].test[:3]
    with_eos = wl.candidate_losses(examples, scenario.choices)
    wl.candidate_eos = False
    without = wl.candidate_losses(examples, scenario.choices)
    assert with_eos.shape == without.shape == (3, len(scenario.choices))
    assert not np.allclose(with_eos, without)
    # The cohort engine's per-client scoring uses the same candidates.
    wl.candidate_eos = True
    from fedamole.metrics import accuracy_from_losses

    assert wl.evaluate(examples, "classification", scenario.choices) == accuracy_from_losses(
        with_eos, [e.label for e in examples]
    )


def _scenario(texts_per_split):
    mk = lambda texts: [Example(t, "r") for t in texts]
    return Scenario("x", "generation", [ClientData(*(mk(t) for t in texts_per_split))], info={"a": 1})


def test_drop_long_prompts_from_every_split():
    sc = _scenario((["a", "aaaa", "aaaaa"], ["aaaaa"], ["aa", "aaaaaa"], ["aaaa"]))
    out = drop_long_prompts(sc, len, 5)
    assert [len(x) for x in (out.clients[0].train, out.clients[0].embed, out.clients[0].eval, out.clients[0].test)] == [
        2,
        0,
        1,
        1,
    ]
    assert out.info == {"a": 1, "dropped_long_prompts": 3, "max_length": 5}
    assert len(sc.clients[0].train) == 3  # the input is left alone
    with pytest.raises(ValueError, match="client 0: every training prompt.*max_length"):
        drop_long_prompts(_scenario((["aaaaa"], [], [], [])), len, 5)


def test_build_data_drops_prompts_that_reach_max_length():
    # tiny prompts are "most common letter in xxxxxxxxx? answer: " = 41 bytes + BOS = 42 tokens.
    drop = lambda **model: make_config("tiny", {"model": model, "data": {"drop_long": True}})
    assert build_data(drop(max_length=43)).info["dropped_long_prompts"] == 0
    with pytest.raises(ValueError, match="every training prompt"):
        build_data(drop(max_length=42))
    # Without BOS the same prompts are 41 tokens: they fit.
    assert build_data(drop(max_length=42, add_bos=False)).info["dropped_long_prompts"] == 0
    # Off by default outside the paper presets: prompts are cut by the workload instead.
    assert "dropped_long_prompts" not in build_data(make_config("tiny", {"model": {"max_length": 42}})).info


def test_snli_template_choices_and_pooled_splits(tmp_path):
    import datasets

    rows = lambda labels: datasets.Dataset.from_list(
        [{"premise": f"P{lab}.", "hypothesis": f"H{lab}", "label": lab} for lab in labels]
    )
    datasets.DatasetDict({"train": rows([0, 1]), "validation": rows([2, -1]), "test": rows([1])}).save_to_disk(
        str(tmp_path / "snli")
    )
    ex = load_snli(tmp_path / "snli")
    assert len(ex) == 4  # every split pooled, the unlabelled row dropped
    assert ex[0].text == 'Suppose P0. Can we infer that "H0"? Yes, No, or Maybe?\n'
    assert [e.target for e in ex] == ["Yes", "Maybe", "No", "Maybe"] and SNLI_CHOICES == ["Yes", "Maybe", "No"]
    assert [e.group for e in ex] == ["entailment", "neutral", "contradiction", "neutral"]
    assert len(load_snli(tmp_path / "snli", split="train")) == 2


def test_split_fractions_as_the_authors():
    assert np.allclose(split_fractions(), (0.76, 0.04, 0.10, 0.10))
    train, embed, ev, te = snli_split_fractions()
    assert ev == pytest.approx(10_000 / 570_152) and te == pytest.approx(10_000 / 570_152)
    assert train / embed == pytest.approx(95 / 5) and train + embed + ev + te == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eval_share"):
        split_fractions(eval_share=1.5)


def test_snli_preset_uses_snli_fractions_and_caps(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": int(rng.integers(3))} for i in range(6000)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "snli"))
    cfg = make_config(
        "snli",
        {
            "clients": 4,
            "model": {"type": "tiny-llama"},
            "data": {"path": str(tmp_path / "snli"), "alpha": 100.0},
            "fedamole": {"num_experts": 8},  # 30 experts x 2 holders do not fit 4 clients x 8 (checked up front)
        },
    )
    sc = build_data(cfg)
    for c in sc.clients:
        n = sum(c.sizes().values())
        assert c.sizes()["eval"] == round(n * 10_000 / 570_152) and c.sizes()["test"] == c.sizes()["eval"]
        assert c.sizes()["embed"] == round(n * 0.95 * 0.05 * (1 - 2 * 10_000 / 570_152) / 0.95)
    assert sc.choices == ["Yes", "Maybe", "No"]


def _violates_balance(labels, parts, n_clients):
    """Whether some client received examples of a label after it already held N/C examples (labels in order)."""
    cap = len(labels) / n_clients
    for p in parts:
        counts = Counter(labels[p].tolist())
        held = 0
        for lab in np.unique(labels):
            if held >= cap and counts.get(lab, 0):
                return True
            held += counts.get(lab, 0)
    return False


def test_dirichlet_partition_is_balanced_as_the_authors():
    labels = np.repeat(np.arange(4), 600)
    unbalanced_violations = 0
    for seed in range(6):
        parts = dirichlet_partition(labels, 8, alpha=0.1, seed=seed)
        assert not _violates_balance(labels, parts, 8)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
        free = dirichlet_partition(labels, 8, alpha=0.1, seed=seed, balanced=False)
        unbalanced_violations += _violates_balance(labels, free, 8)
    assert unbalanced_violations > 0  # the check above would notice the unbalanced partition


def test_dirichlet_balanced_survives_an_underflowing_draw():
    parts = dirichlet_partition(np.repeat(np.arange(3), 100), 4, alpha=1e-3, min_samples=0, seed=0)
    assert sum(len(p) for p in parts) == 300


def test_task_partition_largest_then_task_id_order():
    tasks = ["task101_b"] * 9 + ["task1000_a"] * 8 + ["task20_c"] * 7 + ["task3_d"] * 2 + ["task100_e"] * 7
    parts, names = task_partition(tasks, 3, pool=4)
    # The 4 largest are b, a, c, e (d is the smallest); in task-id text order: task100, task1000, task101, task20.
    assert names == ["task100_e", "task1000_a", "task101_b"]
    for idx, name in zip(parts, names):
        assert {tasks[i] for i in idx} == {name} and len(idx) == tasks.count(name)
    assert task_partition(tasks, 5, pool=None)[1][-1] == "task3_d"
    with pytest.raises(ValueError, match="task_pool = 2"):
        task_partition(tasks, 3, pool=2)


def test_natural_instructions_v28_layout_default_train_split(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    for t in ("task001_a", "task002_b", "task003_c"):
        task = {
            "Definition": [f"Define {t}.", "second"],
            "Instances": [{"input": f"in{i}", "output": [f"o{i}", "x"]} for i in range(3)],
        }
        (tmp_path / "tasks" / f"{t}.json").write_text(json.dumps(task))
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task003_c\ntask001_a\n")
    ex = load_natural_instructions(tmp_path)
    assert [e.group for e in ex] == ["task003_c"] * 3 + ["task001_a"] * 3  # every instance of the listed tasks
    assert "### Instruction:\nDefine task003_c.\n\n### Input:\nin0" in ex[0].text and ex[0].target == "o0"
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task009_z\n")
    with pytest.raises(ValueError, match="task009_z"):
        load_natural_instructions(tmp_path)


def test_paper_presets_carry_the_protocol_defaults():
    for name in ("snli", "dolly", "ni"):
        cfg = make_config(name)
        assert cfg.model["max_length"] == 1024, name
        assert cfg.model.get("add_bos", True) and cfg.data["drop_long"] is True, name
        assert cfg.data.get("candidate_eos", True) and cfg.data.get("balanced", True), name
        assert cfg.data.get("max_examples") is None and cfg.data.get("max_per_task") is None, name
    assert make_config("ni").data["task_pool"] == 100
    assert PRESETS["smol-nli"]["data"]["alpha"] == 0.1 and PRESETS["smol-nli"]["data"]["source"] == "vitaminc"
    assert PRESETS["smol-ni"]["data"]["partition"] == "task" and PRESETS["smol-ni"]["model"]["type"] == "smollm2"
    with pytest.raises(ValueError, match="data.tasks"):
        make_config("smol-ni", {"data": {"tasks": "subtask001"}})
    with pytest.raises(ValueError, match="data.balanced"):
        make_config("tiny", {"data": {"balanced": "yes"}})
