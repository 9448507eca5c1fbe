"""Start-up cost (issue 11, part 5): `import fedamole` stays light (no torch._dynamo, PEFT or transformers), while
FedAMoLE stays registered with PEFT for users and torch.compile keeps treating the backend choice as a constant.

The import checks run in fresh subprocesses: the test process has imported everything already."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fedamole
from fedamole_kernels import backends

ROOT = Path(__file__).resolve().parents[1]

TINY_LLAMA = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()
"""


def run_python(code: str, *args: str) -> str:
    """stdout of a fresh interpreter running `code` on this checkout's packages; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("package", ["fedamole", "fedamole_kernels"])
def test_import_pulls_in_neither_dynamo_nor_peft_nor_transformers(package):
    out = run_python(
        f"""
        import sys
        import {package}
        heavy = ("torch._dynamo", "torch._inductor", "peft", "transformers", "datasets", "matplotlib", "scipy",
                 "ray", "triton")
        print([name for name in heavy if name in sys.modules])
        """
    )
    assert out.strip() == "[]"


def test_help_pulls_in_neither_dynamo_nor_transformers_nor_scipy():
    out = run_python(
        """
        import contextlib, io, sys
        from fedamole.simulation.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.suppress(SystemExit):
            main(["simulate", "--help"])
        assert "--preset" in text.getvalue()
        heavy = ("torch._dynamo", "peft", "transformers", "scipy", "matplotlib")
        print([name for name in heavy if name in sys.modules])
        """
    )
    assert out.strip() == "[]"


def test_peft_method_names_resolve_lazily():
    assert "MoLEPeftConfig" in dir(fedamole) and "get_mole_model" in dir(fedamole)
    from fedamole.peft_tuner import MoLEPeftConfig, MoLEPeftModel, get_mole_model

    assert (fedamole.MoLEPeftConfig, fedamole.MoLEPeftModel, fedamole.get_mole_model) == (
        MoLEPeftConfig,
        MoLEPeftModel,
        get_mole_model,
    )
    with pytest.raises(AttributeError, match="no_such_name"):
        fedamole.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A FedAMoLE adapter saved by `save_pretrained` and the logits it gives on fixed ids (non-zero experts)."""
    namespace: dict = {}
    exec(TINY_LLAMA, namespace)
    model = fedamole.get_mole_model(
        namespace["tiny_llama"](), fedamole.MoLEPeftConfig(num_experts=4, rank=4, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_b", "shared_b")):
                param.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    model.eval()
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    ids = torch.arange(12).reshape(2, 6) + 3
    return folder, model(input_ids=ids).logits.detach()


RELOAD = """
import sys
{first}
{second}
assert "peft" in sys.modules
from peft import PeftModel
from fedamole.peft_registration import PeftRegistrationFinder
model = PeftModel.from_pretrained(tiny_llama(), sys.argv[1])
from fedamole.peft_tuner import MoLEPeftConfig  # only now: importing it would register FedAMoLE by itself
assert isinstance(model.peft_config["default"], MoLEPeftConfig)
assert not any(isinstance(f, PeftRegistrationFinder) for f in sys.meta_path)  # the finder left after one use
assert "Registering" not in type(sys.modules["peft"].__loader__).__name__  # PEFT keeps its own loader
ids = torch.arange(12).reshape(2, 6) + 3
torch.save(model(input_ids=ids).logits.detach(), sys.argv[2])
"""


@pytest.mark.parametrize(
    "first, second",
    [
        ("import fedamole\nassert 'peft' not in sys.modules", "import peft"),  # registered when PEFT is imported
        ("import peft", "import fedamole"),  # registered at once
        ("import fedamole", "import transformers, peft.utils"),  # PEFT reached through a submodule import
    ],
    ids=["fedamole-then-peft", "peft-then-fedamole", "fedamole-then-peft-submodule"],
)
def test_peft_from_pretrained_reads_our_adapter_after_import_fedamole(saved_adapter, tmp_path, first, second):
    folder, expected = saved_adapter
    code = TINY_LLAMA + RELOAD.format(first=first, second=second)
    run_python(code, str(folder), str(tmp_path / "logits.pt"))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)


def test_failed_registration_warns_and_leaves_peft_usable():
    out = run_python(
        """
        import json, warnings
        import fedamole.peft_registration as registration
        registration.TUNER_MODULE = "fedamole.no_such_module"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import peft
        from peft import LoraConfig
        LoraConfig(r=2)
        print(json.dumps([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]))
        """
    )
    messages = json.loads(out.strip().splitlines()[-1])
    assert any("could not register FedAMoLE with PEFT" in m and "no_such_module" in m for m in messages), messages


def test_trace_resolver_carries_the_mark_torch_compile_reads():
    """`resolve_backend_for_trace` is marked as `torch.compiler.assume_constant_result` marks functions (without
    importing torch._dynamo for it); if a torch release changes that mechanism, this fails."""

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert getattr(marked, backends.DYNAMO_CONSTANT_MARK, False) is True
    assert getattr(backends.resolve_backend_for_trace, backends.DYNAMO_CONSTANT_MARK, False) is True


def test_compiled_call_resolves_the_backend_once_at_trace_time(monkeypatch):
    """Under torch.compile the backend choice is a trace-time constant: the traced graph never calls the resolver."""
    from fedamole_kernels import mole_lora

    calls = []
    original = backends.resolve_backend

    def counting(backend, device):
        calls.append(backend)
        return original(backend, device)

    monkeypatch.setattr(backends, "resolve_backend", counting)
    x = torch.randn(6, 8)
    a, b, r = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8, 2), torch.randn(1, 2, 8)
    fn = torch.compile(lambda x: mole_lora(x, None, a, b, r, top_k=2, scaling=1.0)[0], fullgraph=True, dynamic=False)
    first = fn(x)
    traced_calls = len(calls)
    second = fn(x + 1)
    assert traced_calls >= 1 and len(calls) == traced_calls
    torch.testing.assert_close(first, mole_lora(x, None, a, b, r, top_k=2, scaling=1.0)[0])
    assert second.shape == first.shape


# -- the default preset's data: stdlib docstrings cached under $FEDAMOLE_CACHE ----------------------------------
FAMILIES = {"a": ("alpha",), "b": ("beta",)}


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A two-module 'standard library' and an empty $FEDAMOLE_CACHE."""
    root = tmp_path / "stdlib"
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "__init__.py").write_text('"""Alpha: a module docstring long enough to be kept as text."""\n')
    (root / "beta.py").write_text('def f():\n    """Beta: a function docstring long enough to be kept too."""\n')
    monkeypatch.setenv("FEDAMOLE_CACHE", str(tmp_path / "cache"))
    return root


def _texts(result) -> list[tuple[str, str]]:
    examples, _ = result
    return [(ex.group, ex.text) for ex in examples]


def test_stdlib_docstrings_come_from_the_cache_on_the_second_call(fake_stdlib, tmp_path, monkeypatch):
    from fedamole.data import offline

    first = offline.stdlib_docstrings(FAMILIES, stdlib=fake_stdlib)
    assert len(list((tmp_path / "cache" / "stdlib-docstrings").glob("*.json"))) == 1
    monkeypatch.setattr(offline, "_docstrings", lambda *a: pytest.fail("parsed although cached"))
    assert offline.stdlib_docstrings(FAMILIES, stdlib=fake_stdlib) == first
    assert [g for g, _ in _texts(first)] == ["a", "b"]


def test_stdlib_docstrings_cache_is_invalidated_by_sources_and_settings(fake_stdlib):
    from fedamole.data.offline import stdlib_docstrings

    before = _texts(stdlib_docstrings(FAMILIES, stdlib=fake_stdlib))
    (fake_stdlib / "beta.py").write_text(
        'def g():\n    """Beta, edited: another docstring long enough to be kept."""\n'
    )
    edited = _texts(stdlib_docstrings(FAMILIES, stdlib=fake_stdlib))
    assert edited[1] == ("b", "Beta, edited: another docstring long enough to be kept.") and edited != before
    assert _texts(stdlib_docstrings(FAMILIES, stdlib=fake_stdlib, min_chars=56)) == [edited[0]]  # other bounds
    assert _texts(stdlib_docstrings({"b": ("beta",)}, stdlib=fake_stdlib)) == [edited[1]]  # other families


def test_stdlib_docstrings_cache_survives_a_corrupt_file_and_an_unwritable_folder(fake_stdlib, tmp_path, monkeypatch):
    from fedamole.data.offline import stdlib_docstrings

    expected = stdlib_docstrings(FAMILIES, stdlib=fake_stdlib, cache=False)
    assert not (tmp_path / "cache").exists()  # cache=False neither reads nor writes
    stdlib_docstrings(FAMILIES, stdlib=fake_stdlib)
    (cached,) = (tmp_path / "cache" / "stdlib-docstrings").glob("*.json")
    for garbage in ("{not json", '{"a": ["x"]}', '{"a": [1], "b": []}'):
        cached.write_text(garbage)
        assert stdlib_docstrings(FAMILIES, stdlib=fake_stdlib) == expected
        assert json.loads(cached.read_text()) == {"a": [expected[0][0].text], "b": [expected[0][1].text]}
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("FEDAMOLE_CACHE", str(blocker))
    assert stdlib_docstrings(FAMILIES, stdlib=fake_stdlib) == expected


# -- the console command: fast exit after main ------------------------------------------------------------------
CONSOLE = """
import atexit, sys, threading, time

class Probe:
    def __del__(self):
        print("torn down", flush=True)

probe = Probe()  # freed only by an ordinary interpreter teardown
atexit.register(lambda: print("atexit ran", flush=True))
mode, sys.argv = sys.argv[1], ["fedamole", *sys.argv[2:]]
import fedamole.simulation.cli as cli

def main(argv=None, inner=cli.main):
    try:
        return inner(argv)
    finally:  # a thread still working when main returns
        if mode == "thread":
            threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()

cli.main = main
cli.run()
"""


def _console(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", CONSOLE, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_console_command_flushes_runs_atexit_and_skips_the_teardown(tmp_path):
    helped = _console("plain", "--help")
    assert helped.returncode == 0 and "simulate" in helped.stdout and "atexit ran" in helped.stdout
    assert "torn down" not in helped.stdout
    failed = _console("plain", "compare", "--preset", "tiny", "--algorithms", "nope", "--out", str(tmp_path / "c"))
    assert failed.returncode == 2 and "--algorithms: unknown ['nope']" in failed.stderr
    assert "atexit ran" in failed.stdout and "torn down" not in failed.stdout


def test_console_command_waits_for_a_running_thread():
    proc = _console("thread", "--help")
    assert proc.returncode == 0 and "thread done" in proc.stdout and "torn down" in proc.stdout
