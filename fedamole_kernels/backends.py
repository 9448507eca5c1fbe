"""Backend table and selection for `mole_lora`.

A backend is a module exposing::

    is_available(device: torch.device) -> bool
    mole_lora_forward(x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a, shared_b, expert_mask,
                      top_k, scaling, router_type) -> (delta, probs, topk_idx)
    mole_lora_backward(grad_delta, grad_probs, x, expert_input, seg_offsets, lora_a, lora_b, router, shared_a,
                       shared_b, expert_mask, probs, topk_idx, top_k, scaling, router_type)
        -> (grad_x, grad_expert_input | None, grad_a, grad_b, grad_router, grad_shared_a | None, grad_shared_b | None)

with the semantics of `fedamole_kernels.reference`. Inputs reach a backend validated and contiguous, with
`expert_mask` always a bool tensor (never None). Modules are imported lazily so that importing the package pulls in
neither Triton nor CUDA.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

# Preference order per device type: the first available backend is the default. On CUDA the Triton kernels fuse
# routing into the shrink pass; on CPU the C++ kernels beat the reference (figures in benchmarks/results/).
BACKEND_MODULES = {
    "reference": "fedamole_kernels.reference",
    "triton": "fedamole_kernels.triton_mole_lora",
    "cuda": "fedamole_kernels.cuda_mole_lora",
    "cpu": "fedamole_kernels.cpu_mole_lora",
}
PREFERENCE = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
BACKEND_ENV_VAR = "FEDAMOLE_BACKEND"


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ImportError:
        return None


_LOADED: dict[str, ModuleType] = {}


def get_backend(name: str) -> ModuleType:
    """The backend module `name`; raises ValueError if unknown, RuntimeError if it cannot be imported."""
    module = _LOADED.get(name)  # every op call asks: a dict hit instead of importlib (~1 us per call)
    if module is not None:
        return module
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_MODULES)} or None, got {name!r}")
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not installed in this build (see available_backends())")
    _LOADED[name] = module
    return module


def _usable(name: str, device: torch.device) -> bool:
    module = _load(name)
    return module is not None and bool(module.is_available(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on `device` (default: CPU, plus CUDA if a GPU is visible), fastest first."""
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.insert(0, torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    names: list[str] = []
    for dev in devices:
        for name in PREFERENCE.get(dev.type, ("reference",)) + tuple(BACKEND_MODULES):
            if name not in names and _usable(name, dev):
                names.append(name)
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to run on `device`: explicit `backend`, else $FEDAMOLE_BACKEND, else the fastest."""
    requested = backend if backend is not None else (os.environ.get(BACKEND_ENV_VAR) or None)
    if requested is not None:
        source = "backend" if backend is not None else f"${BACKEND_ENV_VAR}"
        if requested not in BACKEND_MODULES:
            raise ValueError(f"{source} must be one of {sorted(BACKEND_MODULES)}, got {requested!r}")
        if not _usable(requested, device):
            raise ValueError(
                f"{source}={requested!r} is not available for {device.type} tensors; "
                f"available: {available_backends(device)}"
            )
        return requested
    for name in PREFERENCE.get(device.type, ("reference",)):
        if _usable(name, device):
            return name
    return "reference"


# Under torch.compile the choice is evaluated once at trace time (it depends only on constants and the environment).
# Eager calls use the plain function: going through the compiler's wrapper costs ~0.8 ms per call (measured: 0.74 s
# of a 7 s, 32-client `tiny` simulation).
resolve_backend_for_trace = torch.compiler.assume_constant_result(resolve_backend)
