"""Imports run one way: CLI -> simulation -> federated algorithms -> layers -> kernels.

Read from the source (ast), every import counts, those inside functions and under ``TYPE_CHECKING`` included:

* nothing outside `fedamole.simulation` imports it (the CLI lives there, at the top);
* in the simulation package only the CLI imports the CLI;
* nothing outside `fedamole.fl` and `fedamole.simulation` (the layers, routing, injection, data, ...) imports the
  federated algorithms;
* `fedamole_kernels` never imports `fedamole`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the code of `module`) imports, relative imports resolved; ``from a import b`` counts
    as importing both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _imports_of(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
    assert files, f"no modules found under {package}"
    return {
        _module_name(p): imported_modules(p.read_text(encoding="utf-8"), _module_name(p), p.name == "__init__.py")
        for p in files
    }


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _offenders(package: str, forbidden: str, allowed_in: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in _imports_of(package).items()
        if not any(_within(module, a) for a in allowed_in)
        for name in names
        if _within(name, forbidden)
    )


def test_the_import_reader_sees_every_kind_of_import():
    source = (
        "import fedamole.simulation.runner\n"
        "from fedamole import simulation\n"
        "def f():\n"
        "    from ..simulation.cli import main\n"
        "    from . import engine\n"
    )
    names = imported_modules(source, "fedamole.fl.client")
    assert {"fedamole.simulation.runner", "fedamole.simulation", "fedamole.simulation.cli", "fedamole.fl.engine"} <= (
        names
    )
    assert imported_modules("from . import x\n", "fedamole.fl", is_package=True) >= {"fedamole.fl.x"}
    assert _within("fedamole.simulation.cli", "fedamole.simulation")
    assert not _within("fedamole_kernels.backends", "fedamole")


def test_nothing_below_the_simulation_imports_it():
    offenders = _offenders("fedamole", "fedamole.simulation", allowed_in=("fedamole.simulation",))
    assert not offenders, "imports must run CLI -> simulation -> fl -> layers -> kernels:\n" + "\n".join(offenders)


def test_only_the_cli_imports_the_cli():
    offenders = _offenders("fedamole", "fedamole.simulation.cli", allowed_in=("fedamole.simulation.cli",))
    assert not offenders, "\n".join(offenders)


def test_layers_and_data_do_not_import_the_federated_algorithms():
    offenders = _offenders("fedamole", "fedamole.fl", allowed_in=("fedamole.fl", "fedamole.simulation"))
    assert not offenders, "\n".join(offenders)


def test_the_kernels_never_import_fedamole():
    offenders = _offenders("fedamole_kernels", "fedamole")
    assert not offenders, "\n".join(offenders)
