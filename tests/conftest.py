"""Shared test setup: GPU-marked tests skip cleanly on CPU-only machines."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reload_cpu_tuning() -> None:
    """Makes the C++ CPU kernels reread $FEDAMOLE_CPU_* (no-op before the extension is loaded: it reads them then)."""
    try:
        reload = torch.ops.fedamole_ext.cpu_tuning_reload
    except (AttributeError, RuntimeError):
        return
    reload()


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, made aware of the C++ CPU kernels' tuning variables.

    The kernels read $FEDAMOLE_CPU_SPLIT_MAX_TOKENS and $FEDAMOLE_CPU_PARTIAL_BYTES once, not per call
    (csrc/mole_lora_cpu_common.cpp), so a test that forces a path with monkeypatch.setenv must have them reread: every
    setenv/delenv of a FEDAMOLE_CPU_* variable does, and so does the teardown once the environment is restored.
    """
    for name in ("setenv", "delenv"):
        original = getattr(monkeypatch, name)

        def patched(var, *args, _original=original, **kwargs):
            _original(var, *args, **kwargs)
            if str(var).startswith("FEDAMOLE_CPU_"):
                _reload_cpu_tuning()

        setattr(monkeypatch, name, patched)
    yield monkeypatch
    monkeypatch.undo()
    _reload_cpu_tuning()
