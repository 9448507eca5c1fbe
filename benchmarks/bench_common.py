"""What every benchmark records with its figures, without importing torch (the start-up benchmark's parent process
must not): the load average and the commit measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["commit", "load_average"]


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (`uptime`), recorded with every timing: figures taken above ~1.5 on these
    shared 2-core machines can be off by 2x and are not published."""
    path = Path("/proc/loadavg")
    return [float(v) for v in path.read_text().split()[:3]] if path.exists() else []


def commit(repo: Path) -> str:
    """HEAD of ``repo``, with ``-dirty`` when tracked files differ from it; "unknown" without git."""
    try:
        run = lambda *cmd: subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        dirty = run("git", "status", "--porcelain", "--untracked-files=no")
        return run("git", "rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
