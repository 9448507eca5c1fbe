"""Collect `fedamole simulate`/`compare` run folders (`<algorithm>-seed<seed>/summary.json`) found under DIR into one
table: DIR/compare.md, DIR/compare.json and DIR/compare.png (mean curves, seed 42 or the first seed).

    python benchmarks/summarize_runs.py benchmarks/results/default-preset
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fedamole.fl.runner import plot_history
from fedamole.metrics import mean_std

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
    metric = next(iter(next(iter(runs.values())).values()))["metric"]
    table = {}
    for algo in algorithms:
        seeds = sorted(runs[algo])
        finals = [runs[algo][s]["final_mean"] for s in seeds]
        mean, std = mean_std(finals)
        table[algo] = {"seeds": seeds, "final_mean": mean, "std": std, "per_seed": finals,
                       "initial_mean": [runs[algo][s].get("initial_mean") for s in seeds],
                       "wall_seconds": [round(runs[algo][s]["wall_seconds"], 1) for s in seeds]}
    lines = [f"| algorithm | final {metric}, mean ± std | seeds | per seed | wall s per run |", "|---|---|---|---|---|"]
    for algo, row in table.items():
        per_seed = ", ".join(f"{v:.3f}" for v in row["per_seed"])
        walls = ", ".join(f"{w:.0f}" for w in row["wall_seconds"])
        lines.append(f"| {algo} | {row['final_mean']:.4f} ± {row['std']:.4f} | {len(row['seeds'])} | {per_seed} | "
                     f"{walls} |")
    (args.root / "compare.md").write_text("\n".join(lines) + "\n")
    (args.root / "compare.json").write_text(json.dumps({"metric": metric, "results": table}, indent=2))
    curves = {algo: runs[algo].get(42, next(iter(runs[algo].values()))) for algo in algorithms}
    plot_history(curves, args.root / "compare.png", per_client=False)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
