"""CPU benchmark of `mole_lora` backend "cpu" (C++) against two pure-PyTorch formulations, forward + backward.

Providers, all side by side in one process on the same inputs (fp32 by default):
  cpu      fedamole_kernels.mole_lora(..., backend="cpu"): one call for all segments (clients);
  dense    dense pure-PyTorch MoLE: H = x [A_1..A_E | W_t | A_s]^T in one GEMM, masked softmax, top-k, gated U,
           delta = U [B_1..B_E | B_s]^T, autograd for the backward (one call per client);
  authors  the authors'-style layer: dense routing, then a Python loop over experts on token groups sorted by expert
           (gather, two GEMMs, index_add), shared expert separately, autograd (one call per client).

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
import functools
import json
import math
import os
import platform
import statistics
import time

import torch

from fedamole_kernels import HAS_CPU_EXT, mole_lora


def make_client_params(num_clients, num_experts, rank, d_in, d_out, dtype, seed):
    """Per-client stacked weights [C, ...]; B is random (not LoRA's zeros) so that every path does real work."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    return {
        "lora_a": rand(num_clients, num_experts, rank, d_in, scale=d_in**-0.5),
        "lora_b": rand(num_clients, num_experts, d_out, rank, scale=rank**-0.5),
        "router": rand(num_clients, rank, d_in, scale=d_in**-0.5),
        "shared_a": rand(num_clients, rank, d_in, scale=d_in**-0.5),
        "shared_b": rand(num_clients, d_out, rank, scale=rank**-0.5),
    }


def dense_client(x, a, b, w_t, sa, sb, top_k, scaling):
    """Dense pure-PyTorch formulation for one client (all slots active)."""
    num_tokens = x.shape[0]
    num_experts, rank, d_in = a.shape
    er = num_experts * rank
    h_all = x @ torch.cat([a.reshape(er, d_in), w_t, sa], 0).T  # [T, E*r + 2r]
    h = h_all[:, :er].view(num_tokens, num_experts, rank)
    t = h_all[:, er : er + rank]
    v = h_all[:, er + rank :]
    z = (h * t[:, None, :]).sum(-1) / math.sqrt(rank)
    p = torch.softmax(z, dim=-1)
    vals, idx = p.topk(top_k, dim=-1)
    gates = torch.zeros_like(p).scatter(1, idx, vals / vals.sum(-1, keepdim=True))
    u = torch.cat([(h * gates[..., None]).reshape(num_tokens, er), v], 1) * scaling
    b_cat = torch.cat([b.permute(1, 0, 2).reshape(b.shape[1], er), sb], 1)  # [d_out, E*r + r]
    return u @ b_cat.T, p


def authors_client(x, a, b, w_t, sa, sb, top_k, scaling):
    """Authors'-style layer for one client: dense routing, Python loop over experts on sorted token groups."""
    num_experts, rank, _ = a.shape
    h = torch.stack([x @ a[i].T for i in range(num_experts)], 1)  # expert embeddings, one expert at a time
    t = x @ w_t.T
    z = (h * t[:, None, :]).sum(-1) / math.sqrt(rank)
    p = torch.softmax(z, dim=-1)
    vals, idx = p.topk(top_k, dim=-1)
    weights = vals / vals.sum(-1, keepdim=True)
    out = scaling * ((x @ sa.T) @ sb.T)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # host sync, as in the reference loop
    start = 0
    for i in range(num_experts):
        n = counts[i]
        if n == 0:
            continue
        sel = order[start : start + n]
        start += n
        tok = sel // top_k
        y = (x[tok] @ a[i].T) @ b[i].T
        out = out.index_add(0, tok, y * (scaling * weights.reshape(-1)[sel])[:, None])
    return out, p


def run_cpu(x, offsets, params, top_k, scaling):
    delta, probs, _ = mole_lora(
        x,
        offsets,
        params["lora_a"],
        params["lora_b"],
        params["router"],
        params["shared_a"],
        params["shared_b"],
        top_k=top_k,
        scaling=scaling,
        backend="cpu",
    )
    return delta


def run_per_client(fn, x, offsets, params, top_k, scaling):
    bounds = offsets.tolist()
    outs = []
    for c in range(len(bounds) - 1):
        xc = x[bounds[c] : bounds[c + 1]]
        out, _ = fn(
            xc,
            params["lora_a"][c],
            params["lora_b"][c],
            params["router"][c],
            params["shared_a"][c],
            params["shared_b"][c],
            top_k,
            scaling,
        )
        outs.append(out)
    return torch.cat(outs, 0)


def time_fwd_bwd(providers, x, grad_out, params, warmup, repeat):
    """Median seconds of forward + backward per provider. Providers take turns within each round, so that load
    changes on a shared machine hit them alike."""
    leaves = [x, *params.values()]
    times = {name: [] for name in providers}
    for it in range(warmup + repeat):
        for name, fn in providers.items():
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            fn().backward(grad_out)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


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
    scaling = 2.0
    torch.manual_seed(0)

    rows = []
    cases = {"single": 1, "multi": args.clients}
    for case, clients in cases.items():
        per = args.tokens // clients if case == "multi" else args.tokens
        num_tokens = per * clients
        params = make_client_params(clients, args.experts, args.rank, args.d_in, args.d_out, dtype, seed=1)
        x = torch.randn(num_tokens, args.d_in).to(dtype).requires_grad_()
        grad_out = torch.randn(num_tokens, args.d_out).to(dtype)
        offsets = torch.arange(0, num_tokens + 1, per, dtype=torch.int64)
        common = (x, offsets, params, args.top_k, scaling)
        providers = {
            "cpu": functools.partial(run_cpu, *common),
            "dense": functools.partial(run_per_client, dense_client, *common),
            "authors": functools.partial(run_per_client, authors_client, *common),
        }
        # Same maths: check the providers agree before timing them.
        with torch.no_grad():
            ref = providers["dense"]().float()
            for name in ("cpu", "authors"):
                err = (providers[name]().float() - ref).abs().max().item()
                tol = 1e-3 * ref.abs().max().item() + (1e-4 if dtype == torch.float32 else 5e-2)
                if err > tol:
                    raise SystemExit(f"{case}: provider {name} disagrees with dense (max abs err {err:.3g})")
        timings = time_fwd_bwd(providers, x, grad_out, params, args.warmup, args.repeat)
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
        "args": vars(args),
        "command": "python benchmarks/bench_cpu.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, "") and k != "out_dir"
        ),
    }
    with open(base + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    print(f"wrote {base}.csv and {base}.json")


if __name__ == "__main__":
    main()
