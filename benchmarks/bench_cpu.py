"""CPU benchmark of `mole_lora` backend "cpu" (C++) against two pure-PyTorch formulations, forward + backward.

Providers, all side by side in one process on the same inputs (fp32 by default), from the shared table in
benchmarks/implementations.py (the adapter's delta alone, no base GEMM):
  cpu      "cpu": fedamole_kernels.mole_lora(..., backend="cpu"): one call for all segments (clients);
  dense    "dense": dense pure-PyTorch MoLE (all expert projections in one einsum, masked softmax, top-k, gated
           up-projection), autograd for the backward (one call per client);
  authors  "authors_loop": the authors'-style layer: dense routing, then a Python loop over experts on the tokens
           routed to each (gather, two GEMMs, index_add), shared expert separately, autograd (one call per client).

Cases: "single" (one client, T tokens) and "multi" (C clients x T/C tokens; cpu in one call, the others one call per
client, sequentially). Each timing is the median over --repeat rounds after --warmup rounds; providers alternate
within a round.

    python benchmarks/bench_cpu.py                      # T=2048, d=1024, E=6, r=8, top-2, shared, fp32
    python benchmarks/bench_cpu.py --threads 2 --repeat 20

Writes benchmarks/results/cpu-<date>.csv and .json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from implementations import IMPLEMENTATIONS, Built, Shapes, load_average  # noqa: E402

from fedamole_kernels import HAS_CPU_EXT  # noqa: E402

PROVIDERS = {"cpu": "cpu", "dense": "dense", "authors": "authors_loop"}  # column name -> implementation


def time_fwd_bwd(providers: dict[str, Built], grad_out, warmup, repeat):
    """Median seconds of forward + backward per provider. Providers take turns within each round, so that load
    changes on a shared machine hit them alike."""
    times = {name: [] for name in providers}
    for it in range(warmup + repeat):
        for name, built in providers.items():
            start = time.perf_counter()
            built.forward_backward(grad_out)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_agreement(case: str, providers: dict[str, Built], dtype) -> None:
    """Same maths: the providers must agree with "dense" before they are timed."""
    with torch.no_grad():
        ref = providers["dense"].forward().float()
        for name in ("cpu", "authors"):
            err = (providers[name].forward().float() - ref).abs().max().item()
            tol = 1e-3 * ref.abs().max().item() + (1e-4 if dtype == torch.float32 else 5e-2)
            if err > tol:
                raise SystemExit(f"{case}: provider {name} disagrees with dense (max abs err {err:.3g})")


def run_case(case: str, clients: int, args, dtype) -> list[dict]:
    per = args.tokens // clients if case == "multi" else args.tokens
    num_tokens = per * clients
    shapes = Shapes(num_tokens, args.d_in, args.d_out, args.experts, args.experts, args.rank, clients, args.top_k)
    providers = {
        col: IMPLEMENTATIONS[impl].build(shapes, dtype, "cpu", with_base=False) for col, impl in PROVIDERS.items()
    }
    check_agreement(case, providers, dtype)
    grad_out = torch.randn(num_tokens, args.d_out).to(dtype)
    timings = time_fwd_bwd(providers, grad_out, args.warmup, args.repeat)
    rows = []
    for name, med in timings.items():
        rows.append(
            {
                "case": case,
                "provider": name,
                "clients": clients,
                "tokens": num_tokens,
                "d_in": args.d_in,
                "d_out": args.d_out,
                "experts": args.experts,
                "rank": args.rank,
                "top_k": args.top_k,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "median_ms": round(med * 1e3, 3),
                "speedup_of_cpu": round(med / timings["cpu"], 3),
            }
        )
        print(f"{case:7s} {name:8s} {med * 1e3:9.2f} ms   cpu is {med / timings['cpu']:.2f}x faster")
    return rows


def write_results(rows: list[dict], args, load_before: list[float]) -> None:
    stamp = datetime.date.today().isoformat()
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"cpu-{stamp}" + (f"-{args.tag}" if args.tag else ""))
    with open(base + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "date": stamp,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "args": vars(args),
        "command": "python benchmarks/bench_cpu.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "") and k != "out_dir"
        ),
    }
    with open(base + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    print(f"load average before {load_before}, after {meta['load_average_after']}; wrote {base}.csv and {base}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="clients in the multi-client case")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tag", default="", help="suffix of the result file names (cpu-<date>[-tag])")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not HAS_CPU_EXT:
        raise SystemExit("the C++ extension is not built (pip install --no-build-isolation -e .)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    load_before = load_average()
    rows = []
    for case, clients in {"single": 1, "multi": args.clients}.items():
        rows += run_case(case, clients, args, dtype)
    write_results(rows, args, load_before)


if __name__ == "__main__":
    main()
