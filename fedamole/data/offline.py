"""Real text that every Python installation carries: standard-library docstrings, labelled by module family.

Sources are parsed with ``ast`` (nothing is imported). Families only use packages present in CPython 3.10-3.13
source trees; a family whose packages are missing (e.g. a stripped distribution) is simply smaller. Texts that occur
in more than one family are dropped, duplicates within a family kept once; order is deterministic.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

from fedamole.data.scenarios import Example

__all__ = ["STDLIB_FAMILIES", "stdlib_docstrings"]

STDLIB_FAMILIES: dict[str, tuple[str, ...]] = {
    "asyncio": ("asyncio", "selectors"),
    "concurrency": ("multiprocessing", "concurrent", "threading", "queue", "subprocess"),
    "email": ("email", "smtplib", "mailbox", "imaplib", "poplib", "mimetypes"),
    "importlib": ("importlib", "pkgutil", "zipimport", "modulefinder", "runpy"),
    "logging": ("logging",),
    "testing": ("unittest", "doctest"),
    "web": ("http", "urllib", "wsgiref", "ftplib", "socketserver", "webbrowser"),
    "xml": ("xml", "xmlrpc", "html"),
}


def _files(root: Path, name: str) -> list[Path]:
    pkg, mod = root / name, root / f"{name}.py"
    if pkg.is_dir():
        return sorted(p for p in pkg.rglob("*.py") if "test" not in p.relative_to(root).parts[1:])
    return [mod] if mod.is_file() else []


def _docstrings(path: Path, min_chars: int, max_chars: int) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                text = re.sub(r"\s+", " ", doc).strip()[:max_chars]
                if len(text) >= min_chars:
                    out.append(text)
    return out


def stdlib_docstrings(
    families: dict[str, tuple[str, ...]] | None = None,
    min_chars: int = 40,
    max_chars: int = 400,
    stdlib: str | Path | None = None,
) -> tuple[list[Example], list[str]]:
    """Docstrings of the standard library as a text-classification data set.

    Returns (examples, label names); ``Example.text`` is the docstring (whitespace collapsed, at most
    ``max_chars``), ``label`` the family index and ``group`` the family name.
    """
    families = families or STDLIB_FAMILIES
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"stdlib: no standard library directory at {root}")
    names = sorted(families)
    texts: dict[str, list[str]] = {}
    owner: dict[str, set[str]] = {}
    for fam in names:
        seen: list[str] = []
        for mod in families[fam]:
            for f in _files(root, mod):
                seen.extend(_docstrings(f, min_chars, max_chars))
        texts[fam] = list(dict.fromkeys(seen))
        for t in texts[fam]:
            owner.setdefault(t, set()).add(fam)
    examples = [Example(t, label=i, group=fam) for i, fam in enumerate(names) for t in texts[fam] if len(owner[t]) == 1]
    if not examples:
        raise ValueError(f"stdlib: found no docstrings under {root}")
    return examples, names
