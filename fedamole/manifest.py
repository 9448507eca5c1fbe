"""Tamper-evident file sets: a manifest (JSON) with the SHA-256 and size of every file of a saved folder, and of
itself.

Adapters (`fedamole.save_mole`) and round checkpoints (`fedamole.simulation.checkpoint`) are a few files in one folder.
The manifest lists each file by its plain name (no folder part: every file lies in the manifest's own folder) with its
size and SHA-256, plus a few fields of the writer (a checkpoint's round), and ``manifest_sha256``: the SHA-256 of
the manifest's canonical JSON without that field. Reading verifies the manifest's own hash, then every file's type
(a regular file, not a link), size and hash, streaming in 1 MiB blocks, before the caller parses or allocates
anything from the files.

What it detects: any change of the bytes of a listed file or of the manifest (a bit flip, a truncation, an edit by
hand, a file from another save). What it cannot: a deliberate forger who recomputes the hashes (no secret key is
involved); the callers therefore also bounds-check what they read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedamole.atomic_io import atomic_write

__all__ = [
    "FileRecord",
    "Manifest",
    "file_record",
    "load_json_strict",
    "read_manifest",
    "read_verified_bytes",
    "write_manifest",
    "MANIFEST_FORMAT",
]

MANIFEST_FORMAT = "fedamole-manifest"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
_RESERVED = {"format", "version", "kind", "files", "manifest_sha256"}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    """Size in bytes and SHA-256 (lower-case hex) of one file."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A verified manifest: `kind` (what wrote the folder), `files` (plain name -> record) and the writer's extra
    JSON `fields` (e.g. a checkpoint's ``round``)."""

    kind: str
    files: dict[str, FileRecord]
    fields: dict


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate JSON keys {duplicated}")
    return dict(pairs)


def load_json_strict(data: bytes, where: str):
    """Parse `data` as strict JSON (UTF-8; no NaN/Infinity, no duplicate keys); ValueError naming `where`."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc


def _canonical_sha256(obj: dict) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _open_regular(path: Path) -> int:
    """An fd of `path` opened for reading, refusing anything but a regular file (a link, a folder, a device)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (links and special files are refused)")
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def file_record(path: str | os.PathLike) -> FileRecord:
    """Size and SHA-256 of the regular file `path`, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with os.fdopen(_open_regular(Path(path)), "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
            size += len(block)
    return FileRecord(size=size, sha256=digest.hexdigest())


def write_manifest(path: str | os.PathLike, kind: str, files: Iterable[str], fields: dict | None = None) -> Manifest:
    """Hash `files` (plain names in the folder of `path`) and write the manifest to `path` atomically.

    `fields` are extra JSON values stored at the top level of the manifest (not one of the reserved names)."""
    path = Path(path)
    fields = dict(fields or {})
    clash = sorted(_RESERVED & set(fields))
    if clash:
        raise ValueError(f"manifest fields {clash} are reserved")
    records = {}
    for name in files:
        if not _PLAIN_NAME.fullmatch(name):
            raise ValueError(f"manifest: {name!r} is not a plain file name")
        records[name] = file_record(path.parent / name)
    body = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(records.items())},
        **fields,
    }
    body["manifest_sha256"] = _canonical_sha256(body)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1, allow_nan=False)))
    return Manifest(kind=kind, files=records, fields=fields)


def read_manifest(path: str | os.PathLike, kind: str, allowed_names: Callable[[dict], set[str]] | set[str]) -> Manifest:
    """Read and verify the manifest at `path` and every file it lists.

    `kind` must match the writer's; `allowed_names` is the exact set of file names the manifest must list (or a
    function of the manifest's extra fields returning it, e.g. from the checkpoint's round). Raises
    FileNotFoundError when the manifest or a listed file is missing and ValueError, naming the file or field, for
    anything else: not JSON, wrong format, edited manifest, unexpected names, a link, a size or hash mismatch.
    """
    path = Path(path)
    with os.fdopen(_open_regular(path), "rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: not a fedamole manifest")
    body = load_json_strict(data, str(path))
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a fedamole manifest (format != {MANIFEST_FORMAT!r})")
    if body.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {body.get('version')!r}, this fedamole reads {MANIFEST_VERSION}")
    claimed = body.pop("manifest_sha256", None)
    if not isinstance(claimed, str) or claimed != _canonical_sha256(body):
        raise ValueError(f"{path}: manifest_sha256 does not match the manifest's content (edited or corrupted)")
    if body.get("kind") != kind:
        raise ValueError(f"{path}: kind is {body.get('kind')!r}, expected {kind!r}")
    fields = {k: v for k, v in body.items() if k not in _RESERVED}
    files = body.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: files must be a mapping of file name -> {{size, sha256}}")
    expected = allowed_names(fields) if callable(allowed_names) else set(allowed_names)
    if set(files) != expected:
        raise ValueError(f"{path}: files lists {sorted(files)}, expected exactly {sorted(expected)}")
    records = {}
    for name, entry in files.items():
        if not _PLAIN_NAME.fullmatch(name):
            raise ValueError(f"{path}: files[{name!r}] is not a plain file name in the manifest's folder")
        if not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
            raise ValueError(f"{path}: files[{name!r}] must hold exactly size and sha256")
        size, sha = entry["size"], entry["sha256"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{path}: files[{name!r}].size must be an int >= 0, got {size!r}")
        if not isinstance(sha, str) or not _SHA256_HEX.fullmatch(sha):
            raise ValueError(f"{path}: files[{name!r}].sha256 must be 64 lower-case hex digits")
        records[name] = FileRecord(size=size, sha256=sha)
    for name, record in sorted(records.items()):
        _verify(path.parent / name, record, path)
    return Manifest(kind=kind, files=records, fields=fields)


def _verify(file: Path, record: FileRecord, manifest_path: Path) -> None:
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is listed in {manifest_path} but missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{file} is not a regular file (links and special files are refused)")
    size = info.st_size
    if size != record.size:
        raise ValueError(f"{file} has {size} bytes, {manifest_path} records {record.size} (truncated or tampered)")
    if file_record(file) != record:
        raise ValueError(f"{file} does not match the SHA-256 recorded in {manifest_path} (corrupted or tampered)")


def read_verified_bytes(folder: str | os.PathLike, name: str, manifest: Manifest) -> bytes:
    """The content of `name` (listed in `manifest`), read once and checked against its record, so that what the
    caller parses is exactly what was verified (no window for a swap between the check and the read)."""
    record = manifest.files[name]
    path = Path(folder) / name
    with os.fdopen(_open_regular(path), "rb") as handle:
        data = handle.read(record.size + 1)
    if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"{path} changed after it was verified against its manifest")
    return data
