"""Report of `bench_simulation.py`: cohort/sequential ratios, the issue's targets, the CSV and the plot."""

from __future__ import annotations

from pathlib import Path

# (workload, what, how it is computed, threshold, "min" = the value must reach it / "max" = stay within it). The
# issue's targets on 2 CPU cores; the peak-RSS target applies to every workload measured under both engines.
TARGETS = (
    ("tiny@32", "whole command speed-up: sequential / cohort wall time", "speedup_wall", 3.0, "min"),
    ("default@32", "round speed-up: sequential / cohort round time", "speedup_round", 2.0, "min"),
    ("default@32", "cohort round: real-token FLOP/s / matmul peak", "cohort_fraction_of_peak", 0.70, "min"),
    ("*", "peak RSS: cohort / sequential", "rss_ratio", 2.0, "max"),
)


def _ratios(rows: list[dict]) -> dict[str, dict]:
    """Per workload: speed-ups and memory ratio (where both engines ran) and each engine's fraction of the peak."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        by_engine = {r["engine"]: r for r in rows if r["workload"] == name}
        entry = {f"{e}_fraction_of_peak": r["fraction_of_peak"] for e, r in by_engine.items()}
        seq, coh = by_engine.get("sequential"), by_engine.get("cohort")
        if seq and coh:
            entry["speedup_wall"] = round(seq["wall_s"] / coh["wall_s"], 3)
            entry["speedup_round"] = round(seq["round_s"] / coh["round_s"], 3)
            entry["rss_ratio"] = round(coh["peak_rss_mib"] / seq["peak_rss_mib"], 3)
        out[name] = entry
    return out


def targets(rows: list[dict]) -> dict:
    """``{"ratios": per workload, "targets": [each target measured here, with its value and whether it is met]}``."""
    ratios = _ratios(rows)
    checks = []
    for workload, what, key, threshold, kind in TARGETS:
        for name in ratios if workload == "*" else [workload]:
            value = ratios.get(name, {}).get(key)
            if value is None:
                continue
            met = value >= threshold if kind == "min" else value <= threshold
            bound = ">=" if kind == "min" else "<="
            checks.append({"workload": name, "target": f"{what} {bound} {threshold}", "value": value, "met": met})
    return {"ratios": ratios, "targets": checks}


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per run; list values joined with ';', the config's YAML left to the JSON."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "config_yaml"))

    def cell(value) -> str:
        text = ";".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
        return f'"{text}"' if "," in text else text

    lines = [",".join(keys)] + [",".join(cell(r.get(k)) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], peaks_gflops: dict[str, float], path: Path, title: str) -> None:
    """Left: achieved real-token GFLOP/s of a round vs clients, per preset and engine, with the matmul peaks.
    Right: each run's fraction of the peak and its whole-command speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for engine, marker in (("sequential", "o"), ("cohort", "s")):
            pts = sorted(
                (r["clients"], r["round_gflops"]) for r in rows if r["preset"] == preset and r["engine"] == engine
            )
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{preset}, {engine}")
    for (threads, peak), style in zip(peaks_gflops.items(), ("--", ":", "-.")):
        ax.axhline(peak, ls=style, lw=0.9, color="grey", label=f"fp32 matmul peak, {threads} thread(s): {peak:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("real-token GFLOP/s of a round")
    ax.set_title("throughput (round FLOPs on real tokens / round time)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    labels = [f"{r['workload']}\n{r['engine'][:3]}" for r in rows]
    colors = ["tab:blue" if r["engine"] == "sequential" else "tab:orange" for r in rows]
    bars = bx.bar(range(len(rows)), [100 * r["fraction_of_peak"] for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        bx.annotate(
            f"{r['wall_s']:.0f}s", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", fontsize=7
        )
    bx.axhline(70, ls="--", lw=0.8, color="grey")
    bx.set_xticks(range(len(rows)), labels, fontsize=7)
    bx.set_ylabel("% of matmul peak (round)")
    bx.set_title("fraction of the peak (label: whole-command seconds; dashed: 70 % target)", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
