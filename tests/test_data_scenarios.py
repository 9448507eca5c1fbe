"""Partitions, splits, caps, loaders on local files, offline and synthetic data."""

import json
from collections import Counter

import numpy as np
import pytest

from fedamole.data import (
    Example,
    build_scenario,
    dirichlet_partition,
    load_dolly,
    load_natural_instructions,
    load_snli,
    split_client,
    stdlib_docstrings,
    synthetic_classification,
    synthetic_generation,
    task_partition,
)


def test_dirichlet_covers_all_and_min_samples():
    labels = np.repeat(np.arange(3), 200)
    parts = dirichlet_partition(labels, 10, alpha=0.1, min_samples=10, seed=0)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(600))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_skew_depends_on_alpha():
    labels = np.repeat(np.arange(4), 500)

    def mean_max_share(alpha):
        parts = dirichlet_partition(labels, 8, alpha=alpha, seed=3)
        return np.mean([Counter(labels[p]).most_common(1)[0][1] / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.3
    assert mean_max_share(100.0) < 0.35


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="10 x 10 = 100 > 50"):
        dirichlet_partition(np.zeros(50), 10, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(500), 10, 0.0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_partition(np.zeros(500), 0, 1.0)


def test_task_partition_one_task_per_client():
    tasks = ["a"] * 5 + ["b"] * 9 + ["c"] * 7 + ["d"] * 2
    parts, names = task_partition(tasks, 3)
    assert names == ["a", "b", "c"]
    for idx, name in zip(parts, names):
        assert {tasks[i] for i in idx} == {name}
    with pytest.raises(ValueError, match="distinct tasks"):
        task_partition(tasks, 5)


def test_split_fractions_and_caps():
    data = list(range(1000))
    s = split_client(data, seed=0)
    assert s.sizes() == {"train": 760, "embed": 40, "eval": 100, "test": 100}
    assert len(set(s.train) | set(s.embed) | set(s.eval) | set(s.test)) == 1000
    big = split_client(list(range(10000)), test_cap=50, seed=0)
    assert big.sizes() == {"train": 7600, "embed": 200, "eval": 200, "test": 50}
    small = split_client(list(range(10)))
    assert small.sizes() == {"train": 7, "embed": 1, "eval": 1, "test": 1}
    with pytest.raises(ValueError, match=">= 4 examples"):
        split_client([1, 2, 3])
    with pytest.raises(ValueError, match="fractions"):
        split_client(list(range(10)), fractions=(0.5, 0.5, 0.5, 0.5))


def test_build_scenario_generation_test_cap():
    examples = [Example(f"p{i}", f"r{i}", group=f"t{i % 4}") for i in range(4 * 700)]
    sc = build_scenario("x", examples, 4, partition="task", kind="generation")
    assert all(c.sizes()["test"] == 50 for c in sc.clients)
    assert sc.metric == "rouge_l"


def test_snli_loader_local_jsonl(tmp_path):
    rows = [
        {"premise": "A man runs.", "hypothesis": "A person moves.", "label": 0},
        {"premise": "A cat.", "hypothesis": "A dog.", "label": 2},
        {"premise": "x", "hypothesis": "y", "label": -1},
    ]
    f = tmp_path / "snli.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_snli(f)
    assert len(ex) == 2
    assert ex[0].target == "Yes" and ex[1].target == "No" and ex[1].label == 2 and ex[1].group == "contradiction"
    assert ex[0].text == 'Suppose A man runs. Can we infer that "A person moves."? Yes, No, or Maybe?\n'


def test_dolly_loader_local_parquet_and_dir(tmp_path):
    import datasets

    rows = [
        {"instruction": "Name a fruit", "context": "", "response": "Apple", "category": "open_qa"},
        {"instruction": "Summarise", "context": "Long text", "response": "Short", "category": "summarization"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    ex = load_dolly(tmp_path / "d.parquet")
    assert [e.group for e in ex] == ["open_qa", "summarization"]
    assert "### Input:\nLong text" in ex[1].text and ex[1].target == "Short"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert len(load_dolly(tmp_path / "saved")) == 2


def test_natural_instructions_github_layout_and_table(tmp_path):
    for t in range(3):
        task = {
            "Definition": [f"Do task {t}."],
            "Instances": [{"input": f"in{i}", "output": [f"out{i}"]} for i in range(5 + t)],
        }
        (tmp_path / f"task00{t}_x.json").write_text(json.dumps(task))
    ex = load_natural_instructions(tmp_path, max_per_task=6)
    assert Counter(e.group for e in ex) == {"task000_x": 5, "task001_x": 6, "task002_x": 6}
    table = tmp_path / "ni.jsonl"
    table.write_text(json.dumps({"task_name": "t", "definition": "d", "inputs": "i", "targets": "o"}))
    assert load_natural_instructions(table)[0].target == "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="lacks columns"):
        load_natural_instructions(bad)


def test_stdlib_docstrings_offline():
    examples, names = stdlib_docstrings()
    assert len(names) == 8
    counts = Counter(e.group for e in examples)
    assert len(counts) == 8 and min(counts.values()) >= 50
    assert len({e.text for e in examples}) == len(examples)


def test_synthetic_sets():
    ex, choices = synthetic_classification(60, 3)
    assert choices == ["a", "b", "c"]
    for e in ex:
        body = e.text.split(" in ")[1].split("?")[0]
        assert max(choices, key=body.count) == e.target
    gen = synthetic_generation(5)
    assert len({e.group for e in gen}) == 10 and len(gen) == 50


def test_bigbench_natural_instructions_and_vitaminc(tmp_path):
    from fedamole.data import load_bigbench_ni, load_vitaminc

    ni = tmp_path / "natural_instructions"
    for t, n in (("subtask002_b", 3), ("subtask001_a", 2)):
        (ni / t).mkdir(parents=True)
        examples = [{"input": f"in{i}", "target": [f"out{i}", "alt"]} for i in range(n)]
        (ni / t / "task.json").write_text(json.dumps({"task_prefix": f"Definition: {t}", "examples": examples}))
    ex = load_bigbench_ni(ni)
    assert [e.group for e in ex] == ["subtask001_a"] * 2 + ["subtask002_b"] * 3
    assert "### Instruction:\nDefinition: subtask001_a\n\n### Input:\nin0" in ex[0].text and ex[0].target == "out0"
    assert [e.group for e in load_bigbench_ni(ni, tasks=["subtask002_b"])] == ["subtask002_b"] * 3
    with pytest.raises(ValueError, match="no BIG-bench task file"):
        load_bigbench_ni(ni, tasks=["subtask009_missing"])

    vc = tmp_path / "vitaminc_fact_verification"
    vc.mkdir()
    rows = [
        {"input": "T: evidence.\nClaim: c.", "target_scores": {"True": 0, "False": 1, "Neither": 0}},
        {"input": "T: e2.\nClaim: c2.", "target_scores": {"True": 1, "False": 0, "Neither": 0}},
    ]
    (vc / "task.json").write_text(json.dumps({"examples": rows}))
    ex = load_vitaminc(vc)
    assert [(e.target, e.label, e.group) for e in ex] == [("False", 1, "False"), ("True", 0, "True")]
    assert ex[0].text == "Passage: T: evidence.\nClaim: c.\nTrue, False, or Neither? "
    assert len(load_vitaminc(vc, max_examples=1)) == 1
    rows.append({"input": "x", "target_scores": {"True": 1, "False": 1, "Neither": 0}})
    (vc / "task.json").write_text(json.dumps({"examples": rows}))
    with pytest.raises(ValueError, match="example 2 has no single correct answer"):
        load_vitaminc(vc)
