"""Crash-safe file writes shared by adapters (`fedamole.inject`), round checkpoints
(`fedamole.simulation.checkpoint`) and run outputs, and the sweep of the temporary files that a killed writer leaves
behind.

A write goes to ``.<name>.<16 hex digits>.tmp`` next to its destination, created like `open(path, "w")` would create
it (mode 0o666 minus the process umask), then is fsynced and renamed over the destination. A process killed before
the rename leaves that temporary file; `sweep_stale_temp_files` removes such files from a folder that one run owns
(the checkpoint or output folder, at the start or resumption of a run).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

# Our temporary names: ".<target>.<16 hex>.tmp"; also ".<target>.<8 chars>.tmp" (tempfile.mkstemp's, used by
# earlier versions), so that their leftovers are swept too.
_TEMP_NAME = re.compile(r"\..+\.(?:[0-9a-f]{16}|[a-z0-9_]{8})\.tmp")


def _create_temp(path: Path) -> Path:
    """A new empty file next to `path`, created with mode 0o666 so that the kernel applies the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, fsync it, rename it over `path`, and fsync the
    folder: a reader (or a process killed at any instant) sees either the old file or the new one, never half.
    The file gets the mode a plain `open(path, "w")` would give it (0o666 minus the umask)."""
    path = Path(path)
    tmp = _create_temp(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 minus the umask, applied by the kernel at creation
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # writers that recreate the file (safetensors: 0o600)
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_temp_file_name(name: str) -> bool:
    """Whether `name` is a temporary file name of `atomic_write` (``.<target>.<random>.tmp``)."""
    return _TEMP_NAME.fullmatch(name) is not None


def sweep_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that an `atomic_write` killed before its rename left in `folder` (not in its
    subfolders); returns the removed paths. A missing folder is fine (nothing to sweep).

    Call it only on a folder this process owns (a run's output or checkpoint folder, under the run's lock): a
    temporary file of a writer that is still running would be removed too. Only regular files (not links) whose
    name matches `is_temp_file_name` are touched.
    """
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if is_temp_file_name(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed
