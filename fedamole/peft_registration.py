"""FedAMoLE registered as a PEFT method whenever PEFT is in use, without importing PEFT with `fedamole`.

`peft.PeftModel.from_pretrained` (and transformers' adapter loading) find a method through PEFT's registry, so the
registration (`fedamole.peft_tuner`, imported for its side effect) must have run before PEFT reads an adapter of
ours. Importing PEFT costs ~2 s (transformers, torch._dynamo), more than the rest of `import fedamole`, so
`import fedamole` calls `register_with_peft()`, which

* registers at once when PEFT is already imported (importing `fedamole.peft_tuner`);
* otherwise adds a finder to `sys.meta_path` that, when `peft` itself is next imported, lets PEFT's own loader run
  and then imports `fedamole.peft_tuner` (the finder then leaves `sys.meta_path`; nothing else is intercepted).

Either way PEFT's registry holds FEDAMOLE by the time any PEFT code can run after `import fedamole`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

__all__ = ["PeftRegistrationFinder", "register_with_peft"]

TUNER_MODULE = "fedamole.peft_tuner"


def _register() -> None:
    importlib.import_module(TUNER_MODULE)  # its last lines register FedAMoLE with PEFT


def _imported(name: str) -> bool:
    """`name` is in sys.modules and done executing (not a module whose import is still under way)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs PEFT's own loader, then registers FedAMoLE; the module keeps PEFT's loader as its `__loader__`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            _register()
        except Exception as exc:  # a PEFT version we cannot extend must not break `import peft` for its other uses
            warnings.warn(f"fedamole could not register FedAMoLE with PEFT: {exc}", RuntimeWarning, stacklevel=2)


class PeftRegistrationFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that answers only for the top-level `peft` package, once: the spec the other finders give,
    with a loader that registers FedAMoLE after PEFT has loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        self.uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None  # PEFT is not installed: the import fails as it would without us

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)


def register_with_peft() -> None:
    """Register FedAMoLE with PEFT now if PEFT is imported, else as soon as it is (see the module docstring)."""
    if _imported("peft"):
        _register()
    elif not any(isinstance(f, PeftRegistrationFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftRegistrationFinder())
