"""Real text that every Python installation carries: standard-library docstrings, labelled by module family.

Sources are parsed with ``ast`` (nothing is imported). Families only use packages present in CPython 3.10-3.13
source trees; a family whose packages are missing (e.g. a stripped distribution) is simply smaller. Texts that occur
in more than one family are dropped, duplicates within a family kept once; order is deterministic.

Parsing takes ~1 s, every run of the default preset, for the same result: it is cached as JSON under
``$FEDAMOLE_CACHE/stdlib-docstrings/`` (see `fedamole.data.fetch.cache_dir`), keyed by everything the result
depends on: this module's `CACHE_VERSION`, the Python version, the stdlib folder, the families, the length bounds,
and the path, size and modification time of every source file read. A changed key is a miss; an unreadable or
malformed cache file is parsed afresh and replaced; a cache that cannot be written is skipped.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

from fedamole.data.scenarios import Example

__all__ = ["CACHE_VERSION", "STDLIB_FAMILIES", "stdlib_docstrings"]

# Bump whenever the texts this module extracts change for the same sources (parsing, cleaning, filtering).
CACHE_VERSION = 1

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


def _cache_key(root: Path, families: dict, min_chars: int, max_chars: int, files: dict) -> str:
    stats = [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for fs in files.values() for p in fs]
    material = {
        "version": CACHE_VERSION,
        "python": sys.version,
        "root": str(root.resolve()),
        "families": {fam: list(mods) for fam, mods in sorted(families.items())},
        "chars": [min_chars, max_chars],
        "files": stats,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _cache_file(key: str) -> Path:
    from fedamole.data.fetch import cache_dir

    return cache_dir() / "stdlib-docstrings" / f"{key}.json"


def _read_cache(path: Path, names: list[str]) -> dict[str, list[str]] | None:
    """The cached texts per family, or None when the file is missing, unreadable or not what this module writes."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(texts, dict)
        and sorted(texts) == names
        and all(isinstance(ts, list) and all(isinstance(t, str) for t in ts) for ts in texts.values())
    )
    return texts if valid else None


def _write_cache(path: Path, texts: dict[str, list[str]]) -> None:
    from fedamole.atomic_io import atomic_write

    data = json.dumps(texts, ensure_ascii=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))
    except OSError:
        pass  # a read-only or full cache folder: the next run parses again


def _family_texts(files: dict[str, list[Path]], min_chars: int, max_chars: int) -> dict[str, list[str]]:
    """Each family's docstrings, duplicates within the family kept once, in file order."""
    texts = {}
    for fam, paths in files.items():
        seen = [text for f in paths for text in _docstrings(f, min_chars, max_chars)]
        texts[fam] = list(dict.fromkeys(seen))
    return texts


def stdlib_docstrings(
    families: dict[str, tuple[str, ...]] | None = None,
    min_chars: int = 40,
    max_chars: int = 400,
    stdlib: str | Path | None = None,
    cache: bool = True,
) -> tuple[list[Example], list[str]]:
    """Docstrings of the standard library as a text-classification data set.

    Returns (examples, label names); ``Example.text`` is the docstring (whitespace collapsed, at most
    ``max_chars``), ``label`` the family index and ``group`` the family name. With `cache` (default) the parsed
    texts are read from / written to the cache described in the module docstring.
    """
    families = families or STDLIB_FAMILIES
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"stdlib: no standard library directory at {root}")
    names = sorted(families)
    files = {fam: [f for mod in families[fam] for f in _files(root, mod)] for fam in names}
    path = _cache_file(_cache_key(root, families, min_chars, max_chars, files)) if cache else None
    texts = _read_cache(path, names) if path is not None else None
    if texts is None:
        texts = _family_texts(files, min_chars, max_chars)
        if path is not None:
            _write_cache(path, texts)
    owner: dict[str, set[str]] = {}
    for fam in names:
        for t in texts[fam]:
            owner.setdefault(t, set()).add(fam)
    examples = [Example(t, label=i, group=fam) for i, fam in enumerate(names) for t in texts[fam] if len(owner[t]) == 1]
    if not examples:
        raise ValueError(f"stdlib: found no docstrings under {root}")
    return examples, names
