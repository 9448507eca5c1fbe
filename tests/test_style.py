"""The code style the project's CI enforces (issue 14): ``ruff format --check`` and ``ruff check`` clean at 120
columns, no module over 500 lines, no function over 80 lines outside Triton kernels, no C++/CUDA source over 500
lines. Each test lists every offender in one message."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_DIRS = ("fedamole", "fedamole_kernels", "benchmarks", "tests")
CPP_DIRS = ("csrc",)
CPP_SUFFIXES = (".cpp", ".cu")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _py_files() -> list[Path]:
    return sorted(p for d in PY_DIRS for p in (ROOT / d).rglob("*.py") if "build" not in p.relative_to(ROOT).parts)


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with ``triton.jit`` / ``triton.autotune`` (called or not, ``@triton.jit(...)`` included)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = ast.unparse(target)
        if name in ("triton.jit", "triton.autotune", "jit", "autotune"):
            return True
    return False


def _long_functions(path: Path) -> list[str]:
    """``path:qualname (N lines)`` for every function over the limit; nested functions are counted in their parent
    and reported on their own when they are themselves too long."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                n = child.end_lineno - child.lineno + 1
                if n > MAX_FUNCTION_LINES and not _is_triton_kernel(child):
                    out.append(f"{_rel(path)}:{child.lineno} {qual} ({n} lines)")
                visit(child, qual + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("the ruff executable is not installed (pip install ruff, a dev dependency)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _report(offenders: list[str], what: str) -> None:
    """Fail with every offender, one per line."""
    if offenders:
        pytest.fail(f"{len(offenders)} {what}:\n" + "\n".join(f"  {o}" for o in offenders), pytrace=False)


def test_ruff_format_check():
    res = _ruff("format", "--check", "--no-cache", ".")
    if res.returncode != 0:
        pytest.fail(f"ruff format --check . fails (run `ruff format .`):\n{res.stdout}{res.stderr}", pytrace=False)


def test_ruff_check():
    res = _ruff("check", "--no-cache", ".")
    if res.returncode != 0:
        pytest.fail(f"ruff check . fails:\n{res.stdout}{res.stderr}", pytrace=False)


def test_python_modules_at_most_500_lines():
    long = [f"{_rel(p)} ({n} lines)" for p in _py_files() if (n := _line_count(p)) > MAX_MODULE_LINES]
    _report(long, f"Python module(s) over {MAX_MODULE_LINES} lines")


def test_functions_at_most_80_lines_outside_triton_kernels():
    long = [entry for p in _py_files() for entry in _long_functions(p)]
    _report(long, f"function(s) over {MAX_FUNCTION_LINES} lines (Triton kernels exempt)")


def test_cpp_sources_at_most_500_lines():
    files = sorted(p for d in CPP_DIRS for p in (ROOT / d).rglob("*") if p.suffix in CPP_SUFFIXES)
    assert files, "no C++/CUDA sources found under csrc/"
    long = [f"{_rel(p)} ({n} lines)" for p in files if (n := _line_count(p)) > MAX_MODULE_LINES]
    _report(long, f"C++/CUDA source(s) over {MAX_MODULE_LINES} lines")


def test_the_checks_catch_offenders(tmp_path, monkeypatch):
    """The AST check sees a long function and skips a Triton kernel (so the style tests can fail)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = f"import triton\n\n\ndef long_fn():\n{body}\n\n\n@triton.jit\ndef kernel():\n{body}\n"
    f = tmp_path / "mod.py"
    f.write_text(src)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _long_functions(f) == [f"mod.py:4 long_fn ({MAX_FUNCTION_LINES + 1} lines)"]
