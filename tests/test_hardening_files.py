"""Issue 13 rows 5, 6, 12: adapters are tamper-evident and all-or-nothing; temporary files honour the umask and are
swept after a SIGKILL mid-write."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_bert, tiny_llama

import fedamole
from fedamole import MoLEConfig
from fedamole.atomic_io import atomic_write, is_temp_file_name, sweep_stale_temp_files
from fedamole.manifest import write_manifest
from fedamole.simulation.checkpoint import load_checkpoint, save_checkpoint

CONFIG, WEIGHTS, MANIFEST = "mole_config.json", "mole.safetensors", "manifest.json"


def _snapshot(model):
    return {
        "modules": {name: type(module) for name, module in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "attrs": {a: getattr(model, a) for a in ("fedamole_config", "fedamole_extra_trainable") if hasattr(model, a)},
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["attrs"] == before["attrs"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


@pytest.fixture
def adapter(tmp_path):
    model = fedamole.inject_mole(tiny_bert(), MoLEConfig(num_experts=3, rank=4), extra_trainable=["classifier"])
    with torch.no_grad():
        for module in fedamole.mole_modules(model).values():
            module.lora_b.normal_(std=0.1)
    return fedamole.save_mole(model, tmp_path / "adapter")


def _targets():
    """A plain model and an already injected one (with other weights), the two paths of `load_mole`."""
    injected = fedamole.inject_mole(tiny_bert(), MoLEConfig(num_experts=3, rank=4), extra_trainable=["classifier"])
    return [tiny_bert(), injected]


def _forge(folder, meta_edit=None, tensor_edit=None):
    """Rewrite the adapter consistently (manifest recomputed), as a buggy writer or a forger would."""
    if meta_edit is not None:
        meta = json.loads((folder / CONFIG).read_text())
        meta_edit(meta)
        (folder / CONFIG).write_text(json.dumps(meta))
    if tensor_edit is not None:
        tensors = load_file(folder / WEIGHTS)
        tensor_edit(tensors)
        save_file(tensors, folder / WEIGHTS)
    write_manifest(folder / MANIFEST, "fedamole-mole", (CONFIG, WEIGHTS))


def _lora_b_key(tensors):
    return next(k for k in sorted(tensors) if k.endswith("lora_b"))


def _flip_bit(tensors):
    key = _lora_b_key(tensors)
    tensors[key] = (tensors[key].view(torch.int32) ^ 1).view(torch.float32)


def _scale(tensors):
    key = _lora_b_key(tensors)
    tensors[key] = tensors[key] * 1000


def _edit_tensors(edit):
    def apply(folder):
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "fedamole-mole"})  # same size: only the hash differs

    return apply


def _edit_alpha(folder):
    meta = json.loads((folder / CONFIG).read_text())
    meta["config"]["alpha"] = 1600.0
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))


def _edit_manifest_hash(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][WEIGHTS]["sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _symlink_weights(folder):
    elsewhere = folder.parent / "elsewhere.safetensors"
    (folder / WEIGHTS).rename(elsewhere)
    (folder / WEIGHTS).symlink_to(elsewhere)


TAMPERING = {
    "bit flip in lora_b": (_edit_tensors(_flip_bit), "SHA-256"),
    "lora_b x 1000": (_edit_tensors(_scale), "SHA-256"),
    "config JSON edited": (_edit_alpha, "bytes|SHA-256"),
    "manifest hash edited": (_edit_manifest_hash, "manifest_sha256"),
    "weights replaced by a link": (_symlink_weights, "not a regular file"),
    "truncated weights": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-7]), "truncated"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_adapter_is_refused_and_the_model_is_untouched(adapter, case):
    tamper, match = TAMPERING[case]
    tamper(adapter)
    for model in _targets():
        before = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            fedamole.load_mole(model, adapter)
        _assert_unchanged(model, before)


def test_adapter_without_manifest_is_refused(adapter):
    (adapter / MANIFEST).unlink()
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="manifest"):
        fedamole.load_mole(model, adapter)
    _assert_unchanged(model, before)


def _set(section, key, value):
    def edit(meta):
        (meta if section is None else meta[section])[key] = value

    return edit


def _drop_alpha(meta):
    del meta["config"]["alpha"]


MALFORMED = {  # consistent manifests: what the schema and shape checks must catch, naming the field
    "unknown top-level field": (_set(None, "surprise", 1), "unexpected fields"),
    "num_experts changed": (_set("config", "num_experts", 5), r"lora_a.*config implies|num_experts"),
    "rank changed": (_set("config", "rank", 8), "config implies|rank"),
    "extra_trainable a string": (_set(None, "extra_trainable", "classifier"), "extra_trainable"),
    "extra_trainable unknown module": (_set(None, "extra_trainable", ["nope"]), "extra_trainable"),
    "rank a string": (_set("config", "rank", "4"), "rank"),
    "top_k a float": (_set("config", "top_k", 2.5), "top_k"),
    "unknown config field": (_set("config", "temperature", 2.0), "temperature"),
    "config field missing": (_drop_alpha, "alpha"),
    "modules edited": (_set(None, "modules", ["bert.pooler.dense"]), "modules"),
    "version": (_set(None, "version", 1), "version"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_adapter_json_names_the_field_and_leaves_the_model_untouched(adapter, case):
    edit, match = MALFORMED[case]
    _forge(adapter, meta_edit=edit)
    for model in _targets():
        before = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            fedamole.load_mole(model, adapter)
        _assert_unchanged(model, before)


def test_failure_after_injection_restores_modules_flags_and_keys(adapter):
    def poison(tensors):
        key = _lora_b_key(tensors)
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    _forge(adapter, tensor_edit=poison)
    model = tiny_bert()  # every parameter trainable: a failed load must not leave the backbone frozen
    before = _snapshot(model)
    assert all(before["flags"].values())
    with pytest.raises(ValueError, match="NaN"):
        fedamole.load_mole(model, adapter)
    _assert_unchanged(model, before)


def test_huge_claimed_rank_is_refused_before_allocating(adapter, monkeypatch):
    _forge(adapter, meta_edit=_set("config", "rank", 200_000))
    assert (adapter / WEIGHTS).stat().st_size < 100_000

    def no_allocation(*args, **kwargs):
        raise AssertionError("a MoLE layer was allocated before the adapter's shapes were checked")

    monkeypatch.setattr(fedamole.MoLELinear, "__init__", no_allocation)
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="config implies"):
        fedamole.load_mole(model, adapter)
    _assert_unchanged(model, before)


def test_inject_mole_is_all_or_nothing():
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="extra_trainable"):
        fedamole.inject_mole(model, MoLEConfig(num_experts=2), extra_trainable=["classifier", "not_a_module"])
    _assert_unchanged(model, before)
    with pytest.raises(TypeError, match="extra_trainable"):
        fedamole.inject_mole(model, MoLEConfig(num_experts=2), extra_trainable="classifier")
    _assert_unchanged(model, before)


def test_adapter_manifest_covers_every_file_and_itself(adapter):
    manifest = json.loads((adapter / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [WEIGHTS, CONFIG]
    assert len(manifest["manifest_sha256"]) == 64
    model = fedamole.load_mole(tiny_bert(), adapter)
    assert model.classifier.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad


# -- row 12: temporary files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "plain.txt", lambda tmp: open(tmp, "w").write("x"))
        with open(tmp_path / "reference.txt", "w") as handle:
            handle.write("x")
        model = fedamole.inject_mole(tiny_llama(), MoLEConfig(num_experts=2, rank=2))
        fedamole.save_mole(model, tmp_path / "adapter")
        save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.ones(2)})
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "reference.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    written = [tmp_path / "plain.txt", *(tmp_path / "adapter").iterdir(), *(tmp_path / "ckpt").iterdir()]
    assert len(written) == 7
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from fedamole.atomic_io import atomic_write

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"half a checkpoint")
            handle.flush()
        print("writing", flush=True)
        time.sleep(120)

    atomic_write(sys.argv[1], write)
    """
)


def _kill_mid_write(target):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_write_leaves_a_temp_file_that_the_next_load_or_save_sweeps(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, 1, {"w": torch.zeros(3)})
    _kill_mid_write(folder / "checkpoint.json")
    leftovers = [p.name for p in folder.iterdir() if is_temp_file_name(p.name)]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.json.")
    (folder / "notes.tmp").write_text("not ours")
    (folder / ".keep.tmp").write_text("not ours either")
    round_idx, state = load_checkpoint(folder)  # the old checkpoint is intact; the leftover is swept
    assert round_idx == 1 and torch.equal(state["w"], torch.zeros(3))
    assert sorted(p.name for p in folder.iterdir()) == [
        ".keep.tmp", "checkpoint.json", "notes.tmp", "round-1.json", "round-1.safetensors"
    ]  # fmt: skip
    _kill_mid_write(folder / "round-2.safetensors")
    save_checkpoint(folder, 2, {"w": torch.ones(3)})
    assert not [p for p in folder.iterdir() if is_temp_file_name(p.name)]
    assert load_checkpoint(folder)[0] == 2


def test_sweep_touches_only_our_regular_temp_files(tmp_path):
    assert sweep_stale_temp_files(tmp_path / "missing") == []
    ours = [tmp_path / ".summary.json.0123456789abcdef.tmp", tmp_path / ".checkpoint.json.k2_x9ab0.tmp"]
    for path in ours:
        path.write_text("stale")
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    (tmp_path / ".link.json.fedcba9876543210.tmp").symlink_to(target)
    (tmp_path / ".dir.json.fedcba9876543211.tmp").mkdir()
    assert sorted(sweep_stale_temp_files(tmp_path)) == sorted(ours)
    assert target.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".dir.json.fedcba9876543211.tmp", ".link.json.fedcba9876543210.tmp", "precious.txt"
    ]  # fmt: skip
