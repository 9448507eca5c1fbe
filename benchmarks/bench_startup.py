"""Fixed cost of the command line: imports, `fedamole --help`, and the phases of a short `fedamole simulate`.

Every figure is the median over fresh Python subprocesses (a process measures one thing once, so module caches,
the page cache aside, start cold each time). Cases:

| case | what the child runs |
|---|---|
| `python` | `python -c pass`: the interpreter alone |
| `import torch` | `import torch` |
| `import fedamole_kernels` | `import fedamole_kernels` |
| `import fedamole` | `import fedamole` (the user-facing package) |
| `fedamole --help` | the console command: `fedamole.simulation.cli.run()` where it exists, else `sys.exit(main())` |
| `simulate tiny` | the console command `fedamole simulate --preset tiny --clients 32 --rounds 1 --no-progress` |
| `simulate default` | `fedamole simulate --preset default --rounds 1 --no-progress` (MiniLM, 10 clients) |

`wall` is the parent's clock around the whole subprocess. The simulate children time their phases from inside by
wrapping the runner's functions: `import` (the CLI and the modules `main` imports), `config` (argument parsing,
preset, validation, run folder), `data` (`build_data`), `model` (the rest of the runner's `_build`: algorithm,
model with MoLE injected, engine), `initial_eval`, `first_round`, `after_round` (checkpoint, per-round report,
summary), `write_out` (`write_summary`: JSON, CSV, plots); `start_exit` = wall - everything measured inside
(interpreter start-up and exit). Each child also reports which heavy modules (`torch._dynamo`, transformers,
peft, ...) it ended up importing.

    python benchmarks/bench_startup.py --tag after                 # this checkout
    python benchmarks/bench_startup.py --repo /tmp/base --tag before   # another checkout's code (e.g. main)
    python benchmarks/bench_startup.py --smoke                     # seconds; results to a temp dir

$FEDAMOLE_CACHE points at a fresh folder for each run of this script unless it is set; with --cold every child
gets an empty one. Writes benchmarks/results/startup-<date>[-tag].json and .csv with `uptime` before and after
each case and the 1-minute load when each child starts (a child waits, up to --max-wait, for it to fall below 1.5),
and the measured checkout's commit. Cases where a child started at a load average of 1.5 or more are flagged
(`load_ok: false`) and not to be published.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import commit, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "BENCH_STARTUP_JSON "
MAX_LOAD = 1.5
HEAVY = (
    "torch._dynamo",
    "torch._inductor",
    "transformers",
    "peft",
    "datasets",
    "matplotlib",
    "scipy",
    "ray",
    "triton",
    "safetensors",
)

_HEAVY_NOW = f"[m for m in {HEAVY!r} if m in sys.modules]"
_REPORT = f"""
import json, sys
print({MARKER!r} + json.dumps({{"phases": PHASES, "heavy": {_HEAVY_NOW}}}))
"""


def import_child(module: str) -> str:
    """A child that times `import module`."""
    return (
        f"import time\nt0 = time.perf_counter()\nimport {module}\nPHASES = {{'import': time.perf_counter() - t0}}\n"
        + _REPORT
    )


# The command line as its console script runs it: `fedamole.simulation.cli.run()` where it exists (flush, atexit,
# fast exit),
# else `sys.exit(main())`; `main` is wrapped to report the phases (`phases()`) when it returns or exits.
_CONSOLE = f"""
import json
inner_main = cli.main

def measured_main(argv=None):
    T["main_start"] = time.perf_counter()
    try:
        return inner_main(argv)
    finally:
        T["main_end"] = time.perf_counter()
        print({MARKER!r} + json.dumps({{"phases": phases(), "heavy": {_HEAVY_NOW}}}), flush=True)

cli.main = measured_main
if hasattr(cli, "run"):
    cli.run()
else:
    sys.exit(cli.main())
"""

HELP_CHILD = (
    """
import sys, time
T = {"start": time.perf_counter()}
import fedamole.simulation.cli as cli
T["imported"] = time.perf_counter()

def phases():
    return {"import": T["imported"] - T["start"], "help": T["main_end"] - T["main_start"]}
"""
    + _CONSOLE
)

# The runner module (its home moves between versions; the first one found is the one `fedamole.simulation.cli` calls).
SIMULATE_CHILD = (
    """
import importlib, sys, time
T = {"start": time.perf_counter()}
import fedamole.simulation.cli as cli
for name in ("fedamole.simulation.runner", "fedamole.fl.runner"):
    try:
        runner = importlib.import_module(name)
        break
    except ModuleNotFoundError:
        continue
for name in ("fedamole.data.fetch", "fedamole.simulation.reporting", "fedamole.fl.reporting",
             "fedamole.simulation.run_folder", "fedamole.run_folder"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
T["imported"] = time.perf_counter()

def timed(name, label, once=False):
    inner = getattr(runner, name)
    def wrapper(*args, **kwargs):
        if once and label + "_start" in T:
            return inner(*args, **kwargs)
        T[label + "_start"] = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            T[label + "_end"] = time.perf_counter()
    setattr(runner, name, wrapper)

timed("_build", "build")
timed("build_data", "data")
timed("_run_round", "round", once=True)
timed("write_summary", "write")

def phases():
    data = T["data_end"] - T["data_start"]
    return {
        "import": T["imported"] - T["start"],
        "config": T["build_start"] - T["main_start"],
        "data": data,
        "model": T["build_end"] - T["build_start"] - data,
        "initial_eval": T["round_start"] - T["build_end"],
        "first_round": T["round_end"] - T["round_start"],
        "after_round": T["write_start"] - T["round_end"],
        "write_out": T["write_end"] - T["write_start"],
        "post": T["main_end"] - T["write_end"],
    }
"""
    + _CONSOLE
)

SIMULATE_ARGS = {
    "simulate tiny": ["simulate", "--preset", "tiny", "--clients", "32", "--rounds", "1", "--no-progress"],
    "simulate default": ["simulate", "--preset", "default", "--rounds", "1", "--no-progress"],
}


def wait_for_load(limit: float, max_wait: float) -> list[float]:
    """Sleeps (up to `max_wait` seconds) until the 1-minute load average is below `limit`; returns the last one."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load and load[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)
        load = load_average()
    return load


def run_child(code: str, argv: list[str], repo: Path, env: dict, timeout: float) -> dict:
    """One fresh subprocess running `code` in `repo` (its packages first on the path): wall seconds, phases."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child failed (exit {proc.returncode}): {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1][len(MARKER) :])
    phases = report["phases"]
    phases["start_exit"] = wall - sum(phases.values())
    return {"wall": wall, "phases": phases, "heavy": report["heavy"]}


def cases(args) -> list[tuple[str, str, list[str], int]]:
    """(name, child code, argv, repetitions) of every case this run measures."""
    quick = args.repeat
    out = [
        ("python", "PHASES = {}\n" + _REPORT, [], quick),
        ("import torch", import_child("torch"), [], quick),
        ("import fedamole_kernels", import_child("fedamole_kernels"), [], quick),
        ("import fedamole", import_child("fedamole"), [], quick),
        ("fedamole --help", HELP_CHILD, ["--help"], quick),
        ("simulate tiny", SIMULATE_CHILD, SIMULATE_ARGS["simulate tiny"], args.sim_repeat),
    ]
    if not args.skip_default:
        out.append(("simulate default", SIMULATE_CHILD, SIMULATE_ARGS["simulate default"], args.default_repeat))
    return out


def child_env(repo: Path, cache: Path, run_dir: Path, cold: bool, rep: int) -> tuple[dict, list[str]]:
    """Environment of a child (the measured checkout first on sys.path, $FEDAMOLE_CACHE) and its extra argv."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FEDAMOLE_CACHE"] = str(cache / f"cold-{rep}" if cold else cache)
    return env, ["--out", str(run_dir / f"run-{rep}"), "--overwrite"]


def measure(name: str, code: str, argv: list[str], repeat: int, args, cache: Path, run_dir: Path) -> dict:
    """Median wall and phases of `repeat` fresh children, with the load before and after."""
    load_before = wait_for_load(args.max_load, args.max_wait)
    samples, rep_loads = [], []
    for rep in range(repeat):
        env, extra = child_env(args.repo, cache, run_dir, args.cold, rep)
        rep_loads.append(wait_for_load(args.max_load, args.max_wait)[:1])
        samples.append(
            run_child(code, argv + (extra if argv[:1] == ["simulate"] else []), args.repo, env, args.timeout)
        )
    load_after = load_average()
    phases = {key: statistics.median(s["phases"][key] for s in samples) for key in samples[0]["phases"]}
    walls = [s["wall"] for s in samples]
    result = {
        "case": name,
        "repeat": repeat,
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "phases_median": phases,
        "heavy_modules": samples[0]["heavy"],
        "load_before": load_before,
        "load_at_each_start": rep_loads,
        "load_after": load_after,
        # The gate is the load when each child starts: the children's own threads raise it while they run.
        "load_ok": all(load and load[0] < MAX_LOAD for load in rep_loads),
    }
    shown = "  ".join(f"{k} {v:.2f}" for k, v in phases.items() if v >= 0.005)
    print(f"{name:24s} wall {result['wall_median']:6.2f} s (min {min(walls):.2f})  load {load_before[:1]}  {shown}")
    return result


def write_results(args, started: dt.datetime, results: list[dict]) -> Path:
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "repo": str(args.repo),
        "commit": args.commit or commit(args.repo),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cold_cache": args.cold,
        "max_load": MAX_LOAD,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_startup_")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"startup-{started:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    rows = ["case,phase,seconds,repeat,load_before_1min,load_ok"]
    for r in results:
        load = r["load_before"][0] if r["load_before"] else ""
        for phase, seconds in [("wall", r["wall_median"]), *r["phases_median"].items()]:
            rows.append(f"{r['case']},{phase},{seconds:.4f},{r['repeat']},{load},{r['load_ok']}")
    (out / f"{stem}.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote {out / stem}.json and .csv")
    return out / f"{stem}.json"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose code is measured (default: this one)")
    ap.add_argument("--repeat", type=int, default=7, help="children per import / --help case (median reported)")
    ap.add_argument("--sim-repeat", type=int, default=5, help="children for `simulate tiny`")
    ap.add_argument("--default-repeat", type=int, default=3, help="children for `simulate default`")
    ap.add_argument("--skip-default", action="store_true", help="leave out the default preset (MiniLM)")
    ap.add_argument("--cold", action="store_true", help="an empty $FEDAMOLE_CACHE for every child")
    ap.add_argument("--max-load", type=float, default=MAX_LOAD, help="wait for a 1-minute load below this")
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for the load at most")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child at most")
    ap.add_argument("--smoke", action="store_true", help="one child per case, no default preset; temp dir")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--commit", default=None, help="commit to record when --repo is not a git checkout")
    args = ap.parse_args()
    args.repo = args.repo.resolve()
    if args.smoke:
        args.repeat = args.sim_repeat = 1
        args.skip_default, args.max_wait = True, 0.0
    if min(args.repeat, args.sim_repeat, args.default_repeat) < 1:
        ap.error("--repeat, --sim-repeat and --default-repeat must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    scratch = Path(tempfile.mkdtemp(prefix="bench_startup_runs_"))
    cache = Path(os.environ["FEDAMOLE_CACHE"]) if os.environ.get("FEDAMOLE_CACHE") else scratch / "cache"
    print(f"measuring {args.repo} ({commit(args.repo)}), load {load_average()}")
    try:
        results = [measure(*case, args, cache, scratch / "runs") for case in cases(args)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_results(args, started, results)
    if not all(r["load_ok"] for r in results):
        print(f"WARNING: some cases ran at a load average >= {MAX_LOAD}: not for publication")


if __name__ == "__main__":
    main()
