"""A run owns its output folder (``--out``): one run at a time, no silent overwrite, no silent fresh start.

`claim_run_folder` is called before any work. It

* refuses a path that is a file or cannot be written;
* takes an exclusive ``fcntl.flock`` on ``DIR/.fedamole.lock`` for the whole run (the kernel drops it when the
  process ends, even by SIGKILL), so a second run on the same folder fails at once instead of interleaving files;
* without ``--resume``: refuses a folder that already holds files unless ``--overwrite`` is given, which then
  removes the previous run's outputs (only the files fedamole writes there; anything else stays);
* with ``--resume``: refuses a folder that no run has claimed (a mistyped or empty path) and a ``--rounds`` below
  the rounds already checkpointed. A folder claimed by a run killed before its first round resumes from round 1.

The lock file stays in the folder (removing it would let a third run lock a different inode while a second one
still holds the old one); it counts as empty.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fedamole.atomic_io import sweep_stale_temp_files

__all__ = ["LOCK_NAME", "RunFolder", "claim_run_folder"]

LOCK_NAME = ".fedamole.lock"
CHECKPOINT_SUBDIR = "checkpoint"


@dataclass
class RunFolder:
    """An output folder held by this process until `release` (or the end of a ``with`` block)."""

    path: Path
    handle: TextIO

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _contents(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME)


def _checkpointed_rounds(folder: Path) -> int | None:
    """Rounds recorded in the folder's checkpoint, or None when it holds none. An unreadable checkpoint is left for
    `fedamole.simulation.checkpoint.load_checkpoint` to report in full."""
    from fedamole.simulation.checkpoint import CHECKPOINT_JSON

    meta = folder / CHECKPOINT_SUBDIR / CHECKPOINT_JSON
    if not meta.is_file():
        return None
    try:
        done = json.loads(meta.read_text()).get("round")
    except (OSError, ValueError, AttributeError):
        return 0
    return done if isinstance(done, int) and not isinstance(done, bool) else 0


def _lock(folder: Path) -> RunFolder:
    lock_path = folder / LOCK_NAME
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the whole run
    except OSError as exc:
        raise ValueError(f"--out {folder}: cannot write there ({exc.strerror})") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(
            f"--out {folder} is in use by another fedamole run (process {owner} holds "
            f"{lock_path}); wait for it or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return RunFolder(folder, handle)


def claim_run_folder(
    out: Path, outputs: tuple[str, ...], *, resume: bool = False, overwrite: bool = False, rounds: int | None = None
) -> RunFolder:
    """Lock `out` for this run and check that the run may write there (see the module docstring).

    outputs: names (glob patterns) of what a run writes in `out`; ``--overwrite`` removes exactly these.
    rounds: the run's ``--rounds``, checked against the checkpoint when resuming.
    Raises ValueError naming ``--out``, ``--resume``, ``--overwrite`` or ``--rounds``."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite discards it: give one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if resume and not (out / LOCK_NAME).is_file() and _checkpointed_rounds(out) is None:
        raise ValueError(
            f"--resume: {out} holds no fedamole run to resume (no {LOCK_NAME}); check --out, or drop "
            "--resume to start a new run"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    folder = _lock(out)
    try:
        # Temp files left by a run killed mid-write (ours only: this folder is locked by this run now).
        sweep_stale_temp_files(out)
        if (out / CHECKPOINT_SUBDIR).is_dir():
            sweep_stale_temp_files(out / CHECKPOINT_SUBDIR)
        if resume:
            done = _checkpointed_rounds(out)
            if done is None and _contents(out) and _contents(out) != [out / CHECKPOINT_SUBDIR]:
                raise ValueError(
                    f"--resume: {out} holds files but no checkpoint in {out / CHECKPOINT_SUBDIR}; "
                    "nothing to resume (use --overwrite to start over)"
                )
            if done is not None and rounds is not None and rounds < done:
                raise ValueError(
                    f"--rounds {rounds} is less than the {done} rounds already done in {out}; give --rounds >= {done}"
                )
        elif _contents(out):
            if not overwrite:
                shown = ", ".join(p.name for p in _contents(out)[:5])
                raise ValueError(
                    f"--out {out} is not empty ({shown}); give --resume to continue the run there, "
                    "--overwrite to replace it, or another --out"
                )
            for pattern in outputs:
                for path in out.glob(pattern):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
    except BaseException:
        folder.release()
        raise
    return folder
