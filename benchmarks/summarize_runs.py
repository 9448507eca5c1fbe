"""Collect `fedamole simulate`/`compare` run folders (`<algorithm>-seed<seed>/summary.json`) found under DIR into one
table: DIR/compare.md, DIR/compare.json and DIR/compare.png, as `fedamole compare` writes them (final-round and
best-round means +- std over seeds; curves with seed bands).

    python benchmarks/summarize_runs.py benchmarks/results/default-preset
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fedamole.simulation.reporting import write_comparison

ORDER = ("fedamole", "fedit-ft", "fedit", "local", "fedamole-static")


def collect(root: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(root.rglob("summary.json")):
        match = re.fullmatch(r"(.+)-seed(\d+)", path.parent.name)
        if match:
            runs.setdefault(match.group(1), {})[int(match.group(2))] = json.loads(path.read_text())
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    runs = collect(args.root)
    if not runs:
        raise SystemExit(f"no <algorithm>-seed<seed>/summary.json under {args.root}")
    algorithms = [a for a in ORDER if a in runs] + sorted(set(runs) - set(ORDER))
    _, markdown = write_comparison({a: [runs[a][s] for s in sorted(runs[a])] for a in algorithms}, args.root)
    print(markdown, end="")


if __name__ == "__main__":
    main()
