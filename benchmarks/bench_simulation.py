"""Simulation speed, memory and FLOP efficiency: `--engine cohort` vs `--engine sequential`, side by side (issue 11).

Workloads (``PRESET:CLIENTS[:ROUNDS]``): ``tiny:32:2``, ``tiny:128:2`` and ``default:32:1`` by default. Each runs
under every engine with the same seed, as a subprocess, exactly as a user runs it::

    fedamole simulate --config W.yaml --preset P --clients N --rounds R --engine E --seed S --no-progress --out DIR

``W.yaml`` only scales what the preset cannot serve at N clients: for ``tiny`` the data (``data.n = 60 N``, the
preset's 60 per client) and the expert pool (``fedamole.num_experts = max(8, N)``); for ``default`` the expert pool
(``fedamole.num_experts = ceil(1.25 N)``: 40 at 32 clients, as the issue measured; the preset's 30 cannot give 32
clients 2 experts each).

Reported per run: the whole command's wall time; the round time (the summary's per-round ``seconds`` of the
training rounds, mean over rounds; the time before the first round, model and data build plus the initial
evaluation, is ``wall_seconds`` minus the rounds); the child's peak RSS (its own rusage); the final metric; the
load average before and after. Per workload, the FLOPs of one round on real tokens only (`sim_flops.round_flops`,
from the model's shapes) give the achieved FLOP/s (round FLOPs / round time) and its fraction of the fp32 matmul
peak measured in this process (`sim_flops.matmul_peak`, at the thread count the runs use: ``threads`` of the
configuration, else torch's default), and the floor (round FLOPs / peak) each round is compared with.

Writes benchmarks/results/simulation-<device>-<date>.{csv,json,png}; the JSON also holds the command lines, git
commit, torch version, thread counts, peaks, and each target of the issue with the measured ratio and whether it
is met. Timings are only worth publishing from a quiet machine (load average <= 1.5): before each run the script
waits up to ``--settle`` seconds for the 1-minute load to fall to ``--max-load``, and records it. Run from the
repository root::

    python benchmarks/bench_simulation.py                          # the issue's table (~10 min on 2 cores)
    python benchmarks/bench_simulation.py --repeat 3               # each run 3 times, engines interleaved, medians
    python benchmarks/bench_simulation.py --quick                  # tiny:8:1 and default:4:1, a functional check
    python benchmarks/bench_simulation.py --workloads tiny:32 --engines cohort
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim_flops  # noqa: E402
from implementations import load_average  # noqa: E402
from sim_report import plot, targets, write_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FULL = ("tiny:32:2", "tiny:128:2", "default:32:1")
QUICK = ("tiny:8:1", "default:4:1")
ENGINES = ("sequential", "cohort")
PRESET_ROUNDS = {"tiny": 2, "default": 1}


@dataclass(frozen=True)
class Workload:
    """One preset at one client count for a number of rounds, scaled as the module docstring says."""

    preset: str
    clients: int
    rounds: int
    max_per_client: int | None = None  # data.max_per_client: a smaller data set (quick runs)
    local_steps: int | None = None  # --local-steps: fewer steps (quick runs); None = the preset's

    @property
    def name(self) -> str:
        return f"{self.preset}@{self.clients}"

    def overrides(self) -> dict:
        """What the YAML file given to `fedamole simulate --config` holds."""
        n = self.clients
        if self.preset == "tiny":
            out = {"data": {"n": 60 * n}, "fedamole": {"num_experts": max(8, n)}}
        else:
            out = {"data": {}, "fedamole": {"num_experts": math.ceil(1.25 * n)}}
        if self.max_per_client is not None:
            out["data"]["max_per_client"] = self.max_per_client
        return {k: v for k, v in out.items() if v}

    def config(self):
        """The configuration the command line builds (for the FLOP count and the thread count)."""
        flags = {"clients": self.clients, "rounds": self.rounds}
        if self.local_steps is not None:
            flags["local_steps"] = self.local_steps
        return sim_flops.make_config(self.preset, {**self.overrides(), **flags})


def parse_workload(text: str) -> Workload:
    """``PRESET:CLIENTS[:ROUNDS]`` (rounds: 2 for tiny, 1 for default) -> `Workload`."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in PRESET_ROUNDS or not all(p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(
            f"workload must be PRESET:CLIENTS[:ROUNDS] with PRESET one of {sorted(PRESET_ROUNDS)}, got {text!r}"
        )
    rounds = int(parts[2]) if len(parts) == 3 else PRESET_ROUNDS[parts[0]]
    if int(parts[1]) < 1 or rounds < 1:
        raise argparse.ArgumentTypeError(f"workload {text!r}: clients and rounds must be >= 1")
    return Workload(parts[0], int(parts[1]), rounds)


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


def _git() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def settle(max_load: float, timeout: float) -> list[float]:
    """Wait up to ``timeout`` seconds for the 1-minute load average to fall to ``max_load``; returns the loads."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    return load_average()


def run_simulate(w: Workload, engine: str, seed: int, work: Path, extra: dict | None = None) -> dict:
    """One `fedamole simulate` subprocess: wall time, its peak RSS and the summary's figures."""
    run = Path(tempfile.mkdtemp(prefix=f"{w.preset}-{w.clients}-{engine}-", dir=work))  # simulate refuses old --out
    cfg, out = run / "config.yaml", run / "out"
    config_yaml = json.dumps({**w.overrides(), **(extra or {})})  # JSON is YAML
    cfg.write_text(config_yaml + "\n")
    args = ["simulate", "--config", str(cfg), "--preset", w.preset, "--clients", str(w.clients)]
    args += ["--rounds", str(w.rounds), "--engine", engine, "--seed", str(seed), "--no-progress", "--out", str(out)]
    if w.local_steps is not None:
        args += ["--local-steps", str(w.local_steps)]
    load_before = load_average()
    t0 = time.perf_counter()
    with open(run / "output.txt", "w+") as log:  # a file, not a pipe: nothing reads a pipe while we wait
        proc = subprocess.Popen([*_command(), *args], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (its peak RSS), not every child's
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"fedamole {' '.join(args)} failed ({proc.returncode}):\n{log.read()[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rounds = [h["seconds"] for h in summary["history"]]
    row = {"workload": w.name, "preset": w.preset, "clients": w.clients, "rounds": w.rounds, "engine": engine}
    row.update(seed=seed, wall_s=round(wall, 3), simulate_s=round(summary["wall_seconds"], 3))
    row.update(round_s=round(sum(rounds) / len(rounds), 3), round_s_each=[round(s, 3) for s in rounds])
    row["before_rounds_s"] = round(summary["wall_seconds"] - sum(rounds), 3)
    for key in ("initial_seconds", "peak_rss_bytes"):  # reported by the simulation itself where it does
        if key in summary:
            row[key] = summary[key]
    row.update(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), final_mean=summary.get("final_mean"))
    row.update(load_before=load_before, load_after=load_average(), command="fedamole " + " ".join(args))
    row["config_yaml"] = config_yaml
    return row


def with_flops(row: dict, flops: sim_flops.RoundFlops, peak: float, threads: int, initial: bool) -> dict:
    """``row`` plus its round's real-token FLOPs, achieved FLOP/s, fraction of ``peak`` and distance to its floor."""
    achieved = flops.total / row["round_s"]
    command = row["rounds"] * flops.total + (flops.evaluation if initial else 0.0)  # the initial round evaluates
    row.update(threads=threads, round_gflop=round(flops.total / 1e9, 3))
    row.update(round_gflop_training=round(flops.training / 1e9, 3), round_gflop_eval=round(flops.evaluation / 1e9, 3))
    row.update(round_gflop_stats=round(flops.statistics / 1e9, 3), active_experts=round(flops.active_experts, 3))
    row.update(round_gflops=round(achieved / 1e9, 3), peak_gflops=round(peak / 1e9, 2))
    row.update(fraction_of_peak=round(achieved / peak, 4), floor_s=round(flops.total / peak, 3))
    row.update(round_over_floor=round(row["round_s"] * peak / flops.total, 2))
    row["command_gflops"] = round(command / row["wall_s"] / 1e9, 3)
    return row


MEDIAN_KEYS = ("wall_s", "simulate_s", "round_s", "before_rounds_s", "peak_rss_mib")


def median_row(runs: list[dict]) -> dict:
    """One row for several runs of a workload and engine: the medians of the timings and the peak RSS (each run's
    own values kept as ``<key>_runs``), the loads of every run, the rest from the first run."""
    row = dict(runs[0])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs]
        row[key], row[f"{key}_runs"] = round(statistics.median(values), 3), values
    row.update(repeats=len(runs), load_before=[r["load_before"] for r in runs])
    row.update(load_after=[r["load_after"] for r in runs], load_settled=all(r["load_settled"] for r in runs))
    row.pop("repeat", None)
    return row


def memory_probe(counts: list[int], seed: int, work: Path) -> tuple[list[dict], dict]:
    """Cohort engine on ``tiny`` at growing client counts (one round, no initial evaluation): peak RSS = base +
    N x per-client, extrapolated to the largest N that fits in 24 GiB."""
    probes = [run_simulate(Workload("tiny", n, 1), "cohort", seed, work, {"eval_initial": False}) for n in counts]
    if len(probes) < 2:
        return probes, {}
    (n0, m0), (n1, m1) = [(p["clients"], p["peak_rss_mib"]) for p in (probes[0], probes[-1])]
    per_client = (m1 - m0) / (n1 - n0)
    base = m0 - n0 * per_client
    fits = int((24 * 1024 - base) / per_client) if per_client > 0 else None
    return probes, {"per_client_mib": round(per_client, 3), "base_mib": round(base, 1), "clients_in_24gib": fits}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", type=parse_workload, nargs="+", default=None, help=f"default: {FULL}")
    parser.add_argument(
        "--quick", action="store_true", help=f"workloads {QUICK}, 60 examples per client, 2 local steps: a check"
    )
    parser.add_argument("--max-per-client", type=int, default=None, help="data.max_per_client of every workload")
    parser.add_argument("--local-steps", type=int, default=None, help="--local-steps of every workload")
    parser.add_argument("--clients", type=int, nargs="+", help="shorthand: tiny at these client counts")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the --clients workloads (default 2)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--probe", type=int, nargs="*", default=[], help="memory probe client counts (tiny, cohort)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per workload and engine, engines interleaved; medians reported"
    )
    parser.add_argument("--max-load", type=float, default=1.0, help="load average to wait for before each run")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds to wait at most for --max-load (default: 90 for the full table, 0 for a selection)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def _workloads(args) -> list[Workload]:
    if args.workloads:
        chosen = args.workloads
    elif args.clients:
        chosen = [Workload("tiny", n, args.rounds or PRESET_ROUNDS["tiny"]) for n in args.clients]
    else:
        chosen = [parse_workload(w) for w in (QUICK if args.quick else FULL)]
    cap = args.max_per_client if args.max_per_client is not None else 60 if args.quick else None
    steps = args.local_steps if args.local_steps is not None else 2 if args.quick else None
    return [dataclasses.replace(w, max_per_client=cap, local_steps=steps) for w in chosen]


def _flops_and_threads(workloads: list[Workload]) -> tuple[dict, dict]:
    """Per workload: its round's FLOPs (the models built here are dropped before any run) and its thread count."""
    flops, threads = {}, {}
    for w in workloads:
        cfg = w.config()
        threads[w.name] = int(cfg.threads or torch.get_num_threads())
        flops[w.name] = sim_flops.round_flops(cfg)
        gc.collect()
    return flops, threads


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    workloads = _workloads(args)
    device, date = _device(), datetime.date.today().isoformat()
    full = not (args.workloads or args.clients or args.quick)
    settle_s = args.settle if args.settle is not None else 90.0 if full else 0.0
    flops, threads = _flops_and_threads(workloads)
    peaks = {t: sim_flops.matmul_peak(t) for t in sorted(set(threads.values()))}
    print(json.dumps({"matmul_peak_gflops": {t: round(p / 1e9, 2) for t, p in peaks.items()}}), flush=True)
    runs, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for w in workloads:
            initial = bool(w.config().eval_initial)
            mine = []
            for repeat in range(args.repeat):
                for engine in args.engines:
                    settled = settle(args.max_load, settle_s)
                    row = run_simulate(w, engine, args.seed, Path(tmp))
                    row.update(repeat=repeat, load_settled=settled[0] <= args.max_load)
                    mine.append(with_flops(row, flops[w.name], peaks[threads[w.name]], threads[w.name], initial))
                    print(json.dumps({k: v for k, v in mine[-1].items() if k != "config_yaml"}), flush=True)
            runs.extend(mine)
            for engine in args.engines:
                median = median_row([r for r in mine if r["engine"] == engine])
                rows.append(with_flops(median, flops[w.name], peaks[threads[w.name]], threads[w.name], initial))
        probes, memory = memory_probe(args.probe, args.seed, Path(tmp))
    peaks_after = {t: sim_flops.matmul_peak(t) for t in peaks}
    result = {
        "device": device,
        "date": date,
        "git": _git(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "matmul_peak_gflops": {str(t): round(p / 1e9, 2) for t, p in peaks.items()},
        "matmul_peak_after_gflops": {str(t): round(p / 1e9, 2) for t, p in peaks_after.items()},
        "max_load": args.max_load,
        "quiet": all(r["load_before"][0] <= 1.5 for r in runs),
        "flops": {name: dataclasses.asdict(f) for name, f in flops.items()},
        "repeat": args.repeat,
        "rows": rows,
        "runs": runs,
        "probes": probes,
        "memory": memory,
        **targets(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.out}/simulation-{device}-{date}"  # not Path.with_suffix: CPU names hold dots ("2.80ghz")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(rows + probes, Path(f"{stem}.csv"))
    plot(rows, result["matmul_peak_gflops"], Path(f"{stem}.png"), f"fedamole simulate, {device}, {date}")
    print(json.dumps({k: result[k] for k in ("ratios", "targets", "quiet")}, indent=2))
    print(f"wrote {stem}.json/.csv/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
