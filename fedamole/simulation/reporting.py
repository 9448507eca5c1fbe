"""What a researcher reads after a run: per-round lines and ``metrics.jsonl``, best-round figures, per-client
tables, the expert-assignment heatmap, the communication plot, and the seed-averaged comparison (table + bands).

Everything here reads only a run's summary (``simulate``'s return value, also stored as ``summary.json``), so the
plots of an old run can be redrawn from its file.

The reported number of the FedAMoLE paper is the client mean at the **best round** (rounds 0..R, round 0 being the
untrained model), then the mean over seeds; the final round is reported next to it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedamole.atomic_io import atomic_write
from fedamole.metrics import mean_std

__all__ = [
    "BestRound",
    "best_round",
    "round_line",
    "RoundReporter",
    "write_per_client_table",
    "plot_assignments",
    "plot_communication",
    "SeedBands",
    "seed_bands",
    "comparison_table",
    "plot_comparison",
    "seed_summary",
    "write_comparison",
    "to_json",
    "write_text_atomic",
]


def _number(value) -> float:
    """A summary value as a float (None, a missing value in strict JSON, is NaN)."""
    return float("nan") if value is None else float(value)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class BestRound:
    """The round (0 = before training) whose client mean was highest, and that mean (NaN, round -1: none)."""

    round: int
    mean: float


def best_round(summary: dict) -> BestRound:
    """Best client mean over rounds 0..R of a summary (round 0 counts when the initial evaluation ran)."""
    candidates = [(h["round"], h["mean"]) for h in summary.get("history", []) if _finite(h.get("mean"))]
    if _finite(summary.get("initial_mean")):
        candidates.insert(0, (0, summary["initial_mean"]))
    if not candidates:
        return BestRound(-1, float("nan"))
    r, m = max(candidates, key=lambda rm: (rm[1], -rm[0]))  # ties: the earliest round
    return BestRound(int(r), float(m))


def round_line(entry: dict, best: BestRound, rounds: int) -> str:
    """One line per round: mean, best so far, traffic and time."""
    mb = (entry["bytes_up"] + entry["bytes_down"]) / 2**20
    mean = entry["mean"]
    mean_txt = f"{mean:.4f}" if _finite(mean) else "n/a"
    best_txt = f"{best.mean:.4f} (round {best.round})" if best.round >= 0 else "n/a"
    return (
        f"round {entry['round']}/{rounds}: mean {mean_txt}  best {best_txt}  "
        f"participants {entry.get('participants', '?')}  {mb:.2f} MiB  {entry['seconds']:.1f} s"
    )


class RoundReporter:
    """Called by ``simulate`` after every checkpointed round: prints `round_line` and keeps ``DIR/metrics.jsonl``
    (one JSON object per round). The file is rewritten atomically from the run's history each round, so a run killed
    and resumed never holds a round twice or loses one."""

    def __init__(self, out_dir: str | Path, echo: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.echo = echo

    def __call__(self, summary: dict, history: Sequence[dict]) -> None:
        entry = history[-1]
        best = best_round({"initial_mean": summary.get("initial_mean"), "history": history})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(_plain(_brief(h)), allow_nan=False) for h in history]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        if self.echo:
            tqdm.write(round_line(entry, best, summary.get("rounds", len(history))))


def _brief(entry: dict) -> dict:
    """A history entry without the bulky per-round matrices (those stay in summary.json)."""
    return {k: v for k, v in entry.items() if k != "assignment_share"}


def to_json(obj) -> str:
    """Strict JSON (RFC 8259) of a summary or table: NaN and infinities become null (a missing value), numpy scalars and
    arrays plain numbers and lists; anything else not JSON raises TypeError."""
    return json.dumps(_plain(obj), indent=2, allow_nan=False)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `fedamole.atomic_io.atomic_write` (a reader sees the old file or the new one)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_per_client_table(summary: dict, path: str | Path) -> Path:
    """``per_client.csv``: client, train and test sizes, untrained / final / best-round metric per client."""
    history = summary.get("history", [])
    best = best_round(summary)
    best_per_client = summary.get("initial_per_client") if best.round == 0 else None
    for h in history:
        if h["round"] == best.round:
            best_per_client = h["per_client"]
    num = len(summary.get("test_sizes") or summary.get("final_per_client") or [])
    rows = []
    for c in range(num):
        rows.append(
            {
                "client": c,
                "train_examples": _at(summary.get("train_sizes"), c),
                "test_examples": _at(summary.get("test_sizes"), c),
                "initial": _at(summary.get("initial_per_client"), c),
                "final": _at(summary.get("final_per_client"), c),
                f"best_round_{best.round}": _at(best_per_client, c),
            }
        )
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["client"])
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    write_text_atomic(path, buffer.getvalue())
    return path


def _at(values, i):
    return None if values is None or i >= len(values) else values[i]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_assignments(summary: dict, path: str | Path, max_panels: int = 8) -> Path | None:
    """Heatmaps experts x clients, one panel per round (at most ``max_panels``, evenly spaced, always the first and
    the last): the share of adapted modules in which a client holds each expert. None for runs without experts."""
    rounds = [h for h in summary.get("history", []) if h.get("assignment_share") is not None]
    if not rounds:
        return None
    picks = sorted({round(i) for i in np.linspace(0, len(rounds) - 1, min(max_panels, len(rounds)))})
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(picks), figsize=(2.2 * len(picks) + 1.2, 4.2), squeeze=False, sharey=True, layout="constrained"
    )
    image = None
    for ax, i in zip(axes[0], picks):
        share = np.asarray(rounds[i]["assignment_share"], dtype=float)
        image = ax.imshow(share, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"round {rounds[i]['round']}", fontsize=9)
        ax.set_xlabel("client")
    axes[0][0].set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of modules holding it")
    fig.suptitle(f"{summary.get('algorithm', '')}: expert assignment per round", fontsize=10)
    return _save(fig, plt, path, tight=False)


def plot_communication(summary: dict, path: str | Path) -> Path | None:
    """Bytes per round (up, down) and cumulative traffic in MiB."""
    history = [h for h in summary.get("history", []) if "bytes_up" in h and "bytes_down" in h]
    if not history:
        return None
    plt = _pyplot()
    rounds = [h["round"] for h in history]
    up = np.array([h["bytes_up"] for h in history], dtype=float) / 2**20
    down = np.array([h["bytes_down"] for h in history], dtype=float) / 2**20
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.bar(np.array(rounds) - 0.2, up, width=0.4, label="up (clients -> server)")
    ax1.bar(np.array(rounds) + 0.2, down, width=0.4, label="down (server -> clients)")
    ax1.set_xlabel("round")
    ax1.set_ylabel("MiB per round")
    ax1.legend(fontsize=8)
    ax2.plot(rounds, np.cumsum(up + down), marker="o")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative MiB")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary.get('algorithm', '')}: communication, {summary.get('clients', '?')} clients", fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path, tight: bool = True) -> Path:
    if tight:  # figures with a colorbar use the constrained layout instead
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class SeedBands:
    """Client-mean curve of one algorithm over seeds: rounds (0 = untrained when present), mean and std per round."""

    rounds: list[int]
    mean: list[float]
    std: list[float]


def seed_bands(summaries: Sequence[dict]) -> SeedBands:
    """Mean +- std over seeds of the client mean at each round (a round missing in a seed is left out there)."""
    per_round: dict[int, list[float]] = {}
    for s in summaries:
        if _finite(s.get("initial_mean")):
            per_round.setdefault(0, []).append(s["initial_mean"])
        for h in s.get("history", []):
            per_round.setdefault(h["round"], []).append(h["mean"] if _finite(h.get("mean")) else float("nan"))
    rounds = sorted(per_round)
    stats = [mean_std(per_round[r]) for r in rounds]
    return SeedBands(rounds, [m for m, _ in stats], [sd for _, sd in stats])


def comparison_table(results: dict[str, dict], metric: str, num_seeds: int) -> str:
    """Markdown: final-round and best-round client means (mean +- std over seeds) per algorithm."""
    lines = [
        f"| algorithm | final {metric} | best-round {metric} | best round(s) | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rounds = ",".join(str(b) for b in r["best_rounds"])
        lines.append(
            f"| {name} | {_pm(r['final_mean'], r['final_std'])} | {_pm(r['best_mean'], r['best_std'])} | {rounds} "
            f"| {r['wall_seconds']:.0f} |"
        )
    lines.append(f"\nmean ± std over {num_seeds} seed(s); best round: the best client mean over rounds 0..R per seed")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    return "n/a" if not _finite(mean) else f"{mean:.4f} ± {std:.4f}"


def plot_comparison(bands: dict[str, SeedBands], metric: str, title: str, path: str | Path, chance=None) -> Path:
    """One line per algorithm (mean over seeds) with a ±std band; its last point is the table's final mean."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, b in bands.items():
        mean, std = np.asarray(b.mean, dtype=float), np.asarray(b.std, dtype=float)
        (line,) = ax.plot(b.rounds, mean, marker="o", lw=2, label=name)
        ax.fill_between(b.rounds, mean - std, mean + std, color=line.get_color(), alpha=0.18, lw=0)
    if chance is not None:
        ax.axhline(chance, ls="--", color="grey", lw=1, label="chance")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = untrained)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def seed_summary(runs: Sequence[dict]) -> dict:
    """Final-round and best-round client means of one algorithm's runs (one per seed): mean, std, per seed."""
    finals = [_number(s["final_mean"]) for s in runs]
    bests = [best_round(s) for s in runs]
    final_m, final_sd = mean_std(finals)
    best_m, best_sd = mean_std([b.mean for b in bests])
    return {
        "seeds": [s.get("seed") for s in runs],
        "final_mean": final_m,
        "final_std": final_sd,
        "best_mean": best_m,
        "best_std": best_sd,
        "best_rounds": [b.round for b in bests],
        "per_seed_final": finals,
        "per_seed_best": [b.mean for b in bests],
        "initial_mean": mean_std([_number(s.get("initial_mean")) for s in runs])[0],
        "wall_seconds": float(np.mean([s["wall_seconds"] for s in runs])),
    }


def write_comparison(runs_per_algorithm: dict[str, list[dict]], out_dir: str | Path) -> tuple[dict, str]:
    """DIR/compare.json, DIR/compare.md (`comparison_table`) and DIR/compare.png (`plot_comparison` of
    `seed_bands`) from each algorithm's run summaries; returns (the JSON content, the markdown table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs_per_algorithm.values()))[0]
    seeds = sorted({s.get("seed") for runs in runs_per_algorithm.values() for s in runs}, key=str)
    table = {name: seed_summary(runs) for name, runs in runs_per_algorithm.items()}
    result = {"metric": first["metric"], "seeds": seeds, "results": table}
    write_text_atomic(out / "compare.json", to_json(result))
    markdown = comparison_table(table, first["metric"], len(seeds))
    write_text_atomic(out / "compare.md", markdown)
    bands = {name: seed_bands(runs) for name, runs in runs_per_algorithm.items()}
    title = f"{first.get('scenario', '')}: {first['clients']} clients, {len(seeds)} seed(s) (band: ±std)"
    plot_comparison(bands, first["metric"], title, out / "compare.png", chance=first.get("chance"))
    return result, markdown
