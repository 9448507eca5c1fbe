"""Backend table and selection for `mole_lora`.

A backend is a `Backend` subclass (one instance per backend, registered in `BACKENDS`)::

    is_available(device: torch.device) -> bool
    forward(problem: MoLEProblem) -> (delta, probs, topk_idx)
    backward(problem, grad_delta, grad_probs, probs, topk_idx) -> one gradient per `problem.GRAD_FIELDS` entry
        (x, expert_input | None, lora_a, lora_b, router, shared_a | None, shared_b | None)
    fused: None, or a differentiable op taking `problem.flat_args()` (one dispatcher call, C++ backward node)

with the semantics of `fedamole_kernels.reference`. Problems reach a backend validated and contiguous, with
`expert_mask` always a bool tensor (never None). Backend modules are imported lazily so that importing the package
pulls in neither Triton nor CUDA.
"""

from __future__ import annotations

import importlib
import os

import torch


class Backend:
    """Base of the backends: see the module docstring for the contract."""

    name = ""
    fused = None

    def is_available(self, device: torch.device) -> bool:
        raise NotImplementedError

    def forward(self, problem):
        raise NotImplementedError

    def backward(self, problem, grad_delta, grad_probs, probs, topk_idx):
        raise NotImplementedError


# name -> (module, class, device types where it is a default). Table order is the preference order: the first
# available default backend for a device type is its default. On CUDA the Triton kernels fuse routing into the
# shrink pass; on CPU the C++ kernels beat the reference (figures in benchmarks/results/).
BACKENDS = {
    "triton": ("fedamole_kernels.triton_mole_lora", "TritonBackend", ("cuda",)),
    "cuda": ("fedamole_kernels.cuda_mole_lora", "CudaBackend", ("cuda",)),
    "cpu": ("fedamole_kernels.cpu_mole_lora", "CpuBackend", ("cpu",)),
    "reference": ("fedamole_kernels.reference", "ReferenceBackend", None),  # None: every device type
}
BACKEND_ENV_VAR = "FEDAMOLE_BACKEND"


def _preference(device_type: str) -> tuple[str, ...]:
    return tuple(name for name, (_, _, types) in BACKENDS.items() if types is None or device_type in types)


def _load(name: str) -> Backend | None:
    try:
        module, cls, _ = BACKENDS[name]
        return getattr(importlib.import_module(module), cls)()
    except ImportError:
        return None


_LOADED: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend `name`; raises ValueError if unknown, RuntimeError if it cannot be imported."""
    backend = _LOADED.get(name)  # every op call asks: a dict hit instead of importlib (~1 us per call)
    if backend is not None:
        return backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} is not installed in this build (see available_backends())")
    _LOADED[name] = backend
    return backend


def _usable(name: str, device: torch.device) -> bool:
    backend = _LOADED.get(name)
    if backend is None:
        backend = _load(name)
        if backend is None:
            return False
        _LOADED[name] = backend  # the public `mole_lora` resolves per call: import and build each backend once
    return bool(backend.is_available(device))


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
        for name in _preference(dev.type) + tuple(BACKENDS):
            if name not in names and _usable(name, dev):
                names.append(name)
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend name to run on `device`: explicit `backend`, else $FEDAMOLE_BACKEND, else the fastest."""
    requested = backend if backend is not None else (os.environ.get(BACKEND_ENV_VAR) or None)
    if requested is not None:
        source = "backend" if backend is not None else f"${BACKEND_ENV_VAR}"
        if requested not in BACKENDS:
            raise ValueError(f"{source} must be one of {sorted(BACKENDS)}, got {requested!r}")
        if not _usable(requested, device):
            raise ValueError(
                f"{source}={requested!r} is not available for {device.type} tensors; "
                f"available: {available_backends(device)}"
            )
        return requested
    for name in _preference(device.type):
        if _usable(name, device):
            return name
    return "reference"


def resolve_backend_for_trace(backend: str | None, device: torch.device) -> str:
    """`resolve_backend`, marked for torch.compile as a constant: evaluated once at trace time (the choice depends
    only on its arguments and the environment), not traced into."""
    return resolve_backend(backend, device)


# What `torch.compiler.assume_constant_result` does (it sets this attribute and returns the function), without its
# `import torch._dynamo` (~1 s, a third of `import fedamole`): Dynamo reads the attribute when it meets the call.
# tests/test_startup.py checks that torch still marks functions this way.
DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"
setattr(resolve_backend_for_trace, DYNAMO_CONSTANT_MARK, True)
