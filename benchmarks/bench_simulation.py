"""Simulation speed and memory: `--engine cohort` vs `--engine sequential` on the `tiny` preset (SPEC §4, issue 6).

For each client count N it times the command line exactly as a user runs it::

    fedamole simulate --config tiny-N.yaml --preset tiny --clients N --rounds R --engine E --seed S --no-progress

(``tiny-N.yaml`` only scales the data and the expert pool with N: ``data.n = 60 N`` examples, i.e. the preset's
60 per client, and ``fedamole.num_experts = max(8, N)``; the preset's 240 examples and 8 experts cannot serve more
than 16 / 8 clients). Reported per run: the command's wall time, client-steps per second (N x R x local_steps /
wall), the time spent in the training rounds (the summary's per-round seconds: local training, evaluation,
statistics, aggregation), and the child's peak RSS. A memory probe then runs the cohort engine at growing N (one
round, no initial evaluation), fits peak RSS = base + N x per-client, and extrapolates the largest N that fits in
24 GiB; it also runs the largest probe for real.

Writes benchmarks/results/simulation-<device>-<date>.{csv,json,png}. Run from the repository root::

    python benchmarks/bench_simulation.py                      # N = 8, 32, 128; R = 2; probes 128, 512, 1024
    python benchmarks/bench_simulation.py --clients 8 32 --probe 64 256 --rounds 1   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOCAL_STEPS = 4  # the tiny preset's; batch size 4, one thread


def _device() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1]
                break
    except OSError:
        pass
    words = [w for w in model.replace("(R)", "").replace("(TM)", "").replace("CPU", "").split() if w != "@"]
    name = "-".join(words[:4]).lower() or "cpu"
    return f"cpu-{os.cpu_count()}core-{name}".replace("/", "-")


def _command() -> list[str]:
    exe = shutil.which("fedamole")
    return [exe] if exe else [sys.executable, "-m", "fedamole.simulation.cli"]


def run_simulate(n: int, engine: str, rounds: int, seed: int, work: Path, extra_yaml: str = "") -> dict:
    """One `fedamole simulate` subprocess; returns wall time, peak RSS and the summary's figures."""
    cfg = work / f"tiny-{n}.yaml"
    cfg.write_text(f"data: {{n: {60 * n}}}\nfedamole: {{num_experts: {max(8, n)}}}\n{extra_yaml}")
    out = work / f"run-{engine}-{n}"
    cmd = [
        *_command(),
        "simulate",
        "--config",
        str(cfg),
        "--preset",
        "tiny",
        "--clients",
        str(n),
        "--rounds",
        str(rounds),
        "--engine",
        engine,
        "--seed",
        str(seed),
        "--no-progress",
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (peak RSS), not all children's
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    round_seconds = sum(h["seconds"] for h in summary["history"])
    steps = n * rounds * LOCAL_STEPS
    return {
        "clients": n,
        "engine": engine,
        "rounds": rounds,
        "local_steps": LOCAL_STEPS,
        "seed": seed,
        "wall_s": round(wall, 3),
        "client_steps_per_s": round(steps / wall, 3),
        "round_s": round(round_seconds, 3),
        "round_client_steps_per_s": round(steps / round_seconds, 3),
        "simulate_s": round(summary["wall_seconds"], 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "final_mean": summary["final_mean"],
        "command": " ".join(cmd[len(_command()) - 1 :]),
    }


def _plot(rows: list[dict], probes: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine, marker in (("sequential", "o"), ("cohort", "s")):
        pts = sorted((r["clients"], r["client_steps_per_s"]) for r in rows if r["engine"] == engine)
        ax.plot(*zip(*pts), marker=marker, label=f"{engine} (command wall time)")
        pts = sorted((r["clients"], r["round_client_steps_per_s"]) for r in rows if r["engine"] == engine)
        ax.plot(*zip(*pts), marker=marker, ls=":", alpha=0.6, label=f"{engine} (training rounds only)")
    for n in sorted({r["clients"] for r in rows}):
        s = next(r for r in rows if r["clients"] == n and r["engine"] == "sequential")
        c = next(r for r in rows if r["clients"] == n and r["engine"] == "cohort")
        ax.annotate(
            f"{s['wall_s'] / c['wall_s']:.1f}x",
            (n, c["client_steps_per_s"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients")
    ax.set_ylabel("client-steps / s")
    ax.set_title("throughput (annotation: wall-time speed-up)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if probes:
        bx.plot([p["clients"] for p in probes], [p["peak_rss_mib"] for p in probes], marker="s", label="cohort")
        bx.set_xlabel("clients (one round, one cohort)")
        bx.set_ylabel("peak RSS (MiB)")
        bx.set_title("memory of one process", fontsize=9)
        bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--probe",
        type=int,
        nargs="*",
        default=[128, 512, 1024],
        help="client counts of the memory probe (cohort engine, one round)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device, date = _device(), datetime.date.today().isoformat()
    rows, probes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n in args.clients:
            for engine in ("sequential", "cohort"):
                rows.append(run_simulate(n, engine, args.rounds, args.seed, work))
                print(json.dumps(rows[-1]), flush=True)
        for n in args.probe:
            probes.append(run_simulate(n, "cohort", 1, args.seed, work, "eval_initial: false\n"))
            print(json.dumps(probes[-1]), flush=True)
    result = {
        "device": device,
        "date": date,
        "python": platform.python_version(),
        "rows": rows,
        "probes": probes,
        "speedup_wall": {
            str(n): round(
                next(r["wall_s"] for r in rows if r["clients"] == n and r["engine"] == "sequential")
                / next(r["wall_s"] for r in rows if r["clients"] == n and r["engine"] == "cohort"),
                2,
            )
            for n in args.clients
        },
        "speedup_rounds": {
            str(n): round(
                next(r["round_s"] for r in rows if r["clients"] == n and r["engine"] == "sequential")
                / next(r["round_s"] for r in rows if r["clients"] == n and r["engine"] == "cohort"),
                2,
            )
            for n in args.clients
        },
    }
    if len(probes) >= 2:
        (n0, m0), (n1, m1) = [(p["clients"], p["peak_rss_mib"]) for p in (probes[0], probes[-1])]
        per_client = (m1 - m0) / (n1 - n0)
        base = m0 - n0 * per_client
        result["memory"] = {
            "per_client_mib": round(per_client, 3),
            "base_mib": round(base, 1),
            "clients_in_24gib": int((24 * 1024 - base) / per_client) if per_client > 0 else None,
            "largest_probe_run": n1,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"simulation-{device}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    keys = list(rows[0])
    lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows + probes]
    stem.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    _plot(rows, probes, stem.with_suffix(".png"), f"fedamole simulate --preset tiny, {device}, {date}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "probes")}, indent=2))
    print(f"wrote {stem}.json/.csv/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
