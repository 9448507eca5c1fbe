"""Per-call cost of the MoLE layer next to nn.Linear and PEFT's LoRA layer (CPU, small batches).

Providers, from the shared table benchmarks/implementations.py, built on the same frozen base weights (the input
always needs its gradient, as inside a network):
  linear     "base": nn.Linear alone (no bias)
  peft       "peft": peft.tuners.lora.Linear (r=8, alpha=16, dropout 0), built by `peft.get_peft_model`
  mole       "mole": MoLELinear, backend "cpu" (E=8 slots, r=8, top-2, shared expert, dropout 0)
  mole-ref   "mole-ref": MoLELinear, backend "reference"

Modes: `fwd-nograd` (under torch.no_grad), `fwd` (grad enabled: the graph is built, then dropped), `fwd+bwd`
(backward of y with a fixed output gradient; parameter gradients accumulate, as with gradient accumulation).
Timing: every repetition times a loop of N calls of each provider in turn (the order rotates between repetitions,
so load changes on a shared machine hit all providers alike); the figure is the median over repetitions of the
per-call time. `added` = provider - linear; `ratio_vs_peft` = (mole - linear) / (peft - linear).

Python overhead: at d=16, T=1 the kernels do almost nothing, so `overhead = (mole - linear) - kernel`, where
`kernel` is the backend's forward (and backward) called directly on already prepared inputs.
Op counts: torch.profiler over one call per provider and mode at d=16, T=1: dispatcher ops called from Python
(`top_ops`), all ATen/custom ops (`all_ops`) and host-sync ops (`item`, `_local_scalar_dense`, `nonzero`, ...).

    python benchmarks/bench_layer_overhead.py                       # T {1,8,64,512} x d {512,2048}, 1 thread
    python benchmarks/bench_layer_overhead.py --repeat 31 --tag rerun
    python benchmarks/bench_layer_overhead.py --smoke               # seconds; results to a temp dir

Writes benchmarks/results/layer-overhead-<date>[-tag].csv and .json (or under --out), with the load average
before and after the run, the torch version and the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import commit  # noqa: E402
from implementations import IMPLEMENTATIONS, Built, Shapes, load_average  # noqa: E402

from fedamole_kernels.backends import available_backends, get_backend  # noqa: E402
from fedamole_kernels.problem import MoLEProblem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODES = ("fwd-nograd", "fwd", "fwd+bwd")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal")


IMPLEMENTATION = {"linear": "base", "peft": "peft", "mole": "mole", "mole-ref": "mole-ref"}  # provider -> table


def build_providers(d: int, num_tokens: int, names: list[str], experts: int, rank: int) -> dict[str, Built]:
    """One layer per provider from the implementations table, all on the same frozen W0 [d, d] (LoRA B random so
    that no path is a multiply-by-zero special case)."""
    shapes = Shapes(num_tokens, d, d, experts, experts, rank, 1)
    unknown = [n for n in names if n not in IMPLEMENTATION]
    if unknown:
        raise SystemExit(f"unknown provider {unknown[0]!r}")
    return {name: IMPLEMENTATIONS[IMPLEMENTATION[name]].build(shapes, torch.float32, "cpu") for name in names}


def make_call(built: Built, grad: torch.Tensor, mode: str):
    if mode == "fwd-nograd":

        def call():
            with torch.no_grad():
                built.forward()
    elif mode == "fwd":
        call = built.forward
    else:

        def call():
            built.forward().backward(grad)

    return call


def time_loop(call, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def interleaved_medians(calls: dict, repeat: int, warmup: int, target_s: float) -> tuple[dict[str, float], int]:
    """Median per-call seconds of each callable; all loops have the same N, sized so the slowest takes ~target_s."""
    for call in calls.values():
        time_loop(call, warmup)
    slowest = max(time_loop(call, 3) for call in calls.values())
    n = max(1, min(5000, int(target_s / max(slowest, 1e-7))))
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeat):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            samples[name].append(time_loop(calls[name], n))
    return {name: statistics.median(ts) for name, ts in samples.items()}, n


def kernel_calls(built: Built, grad: torch.Tensor) -> dict[str, object]:
    """The backend's own forward / forward+backward on the prepared inputs that the layer hands it."""
    module, x = built.module, built.tensors["x"]
    backend = get_backend(module.config.backend)
    problem = MoLEProblem(
        x=x.detach(),
        expert_input=None,
        seg_offsets=torch.tensor([0, x.shape[0]], dtype=torch.int64),
        lora_a=module.lora_a[None].detach(),
        lora_b=module.lora_b[None].detach(),
        router=module.router[None].detach(),
        shared_a=module.shared_a[None].detach(),
        shared_b=module.shared_b[None].detach(),
        expert_mask=module.active_experts[None],
        top_k=module.config.top_k,
        scaling=module.config.scaling,
        router_type=module.config.router,
    )
    grad_delta = grad.reshape(-1, module.out_features)

    def fwd():
        return backend.forward(problem)

    def fwd_bwd():
        _, probs, idx = backend.forward(problem)
        backend.backward(problem, grad_delta, None, probs, idx)

    return {"fwd-nograd": fwd, "fwd": fwd, "fwd+bwd": fwd_bwd}


def count_ops(call) -> dict[str, int]:
    """Dispatcher ops of one call: those entered from Python (no op parent), all of them, and host-sync ops."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    events = [e for e in prof.events() if "::" in e.name and not e.name.startswith("autograd::")]
    ops = {id(e) for e in events}

    def has_op_parent(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if id(parent) in ops:
                return True
            parent = parent.cpu_parent
        return False

    return {
        "top_ops": sum(1 for e in events if not has_op_parent(e)),
        "all_ops": len(events),
        "sync_ops": sum(1 for e in events if e.name in SYNC_OPS),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8,64,512", help="comma-separated T")
    ap.add_argument("--d", default="512,2048", help="comma-separated d (d_in = d_out)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--providers", default=None, help="comma-separated (default: linear,peft,mole,mole-ref)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--repeat", type=int, default=15, help="repetitions; the median is reported (>= 15 for results)")
    ap.add_argument("--target-ms", type=float, default=20.0, help="length of one timed loop of N calls")
    ap.add_argument("--overhead-d", type=int, default=16, help="d of the Python-overhead case (T=1)")
    ap.add_argument("--smoke", action="store_true", help="tiny run in seconds (CI); results to a temp dir")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; smoke: tmp)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    return ap.parse_args()


def provider_names(args: argparse.Namespace) -> list[str]:
    names = args.providers.split(",") if args.providers else ["linear", "peft", "mole", "mole-ref"]
    if "cpu" not in available_backends("cpu"):
        names = [n for n in names if n != "mole"]
        print("backend 'cpu' unavailable (extension not built): provider 'mole' skipped")
    if not IMPLEMENTATIONS["peft"].available("cpu"):
        names = [n for n in names if n != "peft"]
    if "linear" not in names:
        names.insert(0, "linear")
    return names


def time_grid(dims, tokens, names, modes, args, timing) -> list[dict]:
    """Per-call medians of every provider for each d x T x mode."""
    rows = []
    for d in dims:
        for num_tokens in tokens:
            built = build_providers(d, num_tokens, names, args.experts, args.rank)
            grad = torch.randn(num_tokens, d)
            for mode in modes:
                calls = {name: make_call(b, grad, mode) for name, b in built.items()}
                medians, n = interleaved_medians(calls, *timing)
                rows += [_row(d, num_tokens, mode, name, t, medians, n, timing[0]) for name, t in medians.items()]
                summary = "  ".join(f"{k} {v * 1e6:8.1f}" for k, v in medians.items())
                print(f"d={d:5d} T={num_tokens:4d} {mode:10s} us/call: {summary}")
    return rows


def python_overhead(names, modes, args, timing) -> list[dict]:
    """At d = --overhead-d, T=1: layer - nn.Linear - the backend's kernels called directly."""
    overhead = []
    mole_names = [n for n in names if n.startswith("mole")]
    d, repeat = args.overhead_d, timing[0]
    built = build_providers(d, 1, ["linear", *mole_names], args.experts, args.rank)
    grad = torch.randn(1, d)
    for mode in modes:
        calls = {name: make_call(b, grad, mode) for name, b in built.items()}
        for name in mole_names:
            calls[f"{name}:kernel"] = kernel_calls(built[name], grad)[mode]
        medians, n = interleaved_medians(calls, *timing)
        for name in mole_names:
            layer, kernel, linear = medians[name], medians[f"{name}:kernel"], medians["linear"]
            overhead.append(
                {
                    "provider": name,
                    "mode": mode,
                    "d": d,
                    "tokens": 1,
                    "layer_us": layer * 1e6,
                    "linear_us": linear * 1e6,
                    "kernel_us": kernel * 1e6,
                    "python_overhead_us": (layer - linear - kernel) * 1e6,
                    "calls_per_loop": n,
                    "repeat": repeat,
                }
            )
            print(
                f"overhead d={d} T=1 {mode:10s} {name}: layer {layer * 1e6:7.1f} us - linear {linear * 1e6:5.1f} "
                f"- kernel {kernel * 1e6:6.1f} = {(layer - linear - kernel) * 1e6:7.1f} us"
            )
    return overhead


def op_counts(names, modes, args) -> list[dict]:
    """Profiler op counts of one call per provider and mode at d = --overhead-d, T=1."""
    d, counts = args.overhead_d, []
    grad = torch.randn(1, d)
    for mode in modes:
        for name, built in build_providers(d, 1, names, args.experts, args.rank).items():
            counts.append(
                {"provider": name, "mode": mode, "d": d, "tokens": 1, **count_ops(make_call(built, grad, mode))}
            )
    for rec in counts:
        print(
            f"ops {rec['mode']:10s} {rec['provider']:8s} top {rec['top_ops']:3d} all {rec['all_ops']:3d} "
            f"sync {rec['sync_ops']}"
        )
    return counts


def write_results(args, started, load_before, repeat, rows, overhead, counts) -> None:
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "commit": commit(ROOT),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "experts": args.experts,
        "rank": args.rank,
        "top_k": 2,
        "repeat": repeat,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_layer_overhead_")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layer-overhead-{started:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "python_overhead": overhead, "op_counts": counts}, indent=1) + "\n"
    )
    print(f"load average after: {meta['load_average_after']}; wrote {out / stem}.csv and .json")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    dims = [int(d) for d in args.d.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if bad := sorted(set(modes) - set(MODES)):
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    names = provider_names(args)
    repeat, warmup, target_s = args.repeat, 20, args.target_ms / 1000
    if args.smoke:
        tokens, dims, repeat, warmup, target_s = [1, 8], [32], 3, 2, 0.002
    started = dt.datetime.now(dt.timezone.utc)
    load_before = load_average()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {load_before}")
    timing = (repeat, warmup, target_s)
    rows = time_grid(dims, tokens, names, modes, args, timing)
    overhead = python_overhead(names, modes, args, timing)
    counts = op_counts(names, modes, args)
    write_results(args, started, load_before, repeat, rows, overhead, counts)


def _row(d, num_tokens, mode, name, t, medians, n, repeat) -> dict:
    linear = medians["linear"]
    peft_added = medians["peft"] - linear if "peft" in medians else float("nan")
    added = t - linear
    ratio = added / peft_added if name.startswith("mole") and peft_added > 0 else float("nan")
    return {
        "d": d,
        "tokens": num_tokens,
        "mode": mode,
        "provider": name,
        "us_per_call": round(t * 1e6, 2),
        "added_us": round(added * 1e6, 2),
        "ratio_vs_peft": round(ratio, 3),
        "calls_per_loop": n,
        "repeat": repeat,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
