"""Benchmark of the adapted layer y = W0 x + mole_lora(x) against the frozen base linear y = W0 x alone.

Every provider times the whole layer (base GEMM included), so `ratio` = time / base time is the overhead the
adapter adds (SPEC target for fwd+bwd: <= 1.10). Modes: fwd (training forward), bwd (backward of a recorded
forward), fwd+bwd. Gradients: x and every adapter weight (the base linear: x only).

    python benchmarks/bench_mole.py                       # GPU: the issue's bf16 shape grid
    python benchmarks/bench_mole.py --preset cpu          # CPU: fp32, T=2048, d=1024, 6 experts, r=8, top-2, shared
    TRITON_INTERPRET=1 python benchmarks/bench_mole.py --smoke   # CI: tiny shape, interpreter, < 60 s

Providers live in PROVIDERS: a name -> Provider(available(device) -> bool, build(case) -> layer callable). Adding
one (e.g. a new backend) is one entry. Results: <out>/<device>-<date>.csv and a .png plot (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any Triton kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedamole_kernels import available_backends, mole_lora  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    tokens: int
    d: int
    slots: int
    active: int
    rank: int
    segments: int
    top_k: int = 2
    shared: bool = True
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


def make_tensors(case: Case) -> dict:
    """Layer inputs: x [T, d] (grad), frozen W0 [d, d], adapter weights (grad), equal-size segments."""
    g = torch.Generator().manual_seed(0)
    S, E, r, d = case.segments, case.slots, case.rank, case.d

    def rnd(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=g) * scale).to(case.dtype).to(case.device)
        return t.requires_grad_(grad)

    mask = torch.zeros(S, E, dtype=torch.bool)
    mask[:, : case.active] = True
    bounds = [round(i * case.tokens / S) for i in range(S + 1)]
    return dict(
        x=rnd(case.tokens, d),
        w0=rnd(d, d, scale=d**-0.5, grad=False),
        lora_a=rnd(S, E, r, d, scale=d**-0.5),
        lora_b=rnd(S, E, d, r, scale=0.1),
        router=rnd(S, r, d, scale=d**-0.5),
        shared_a=rnd(S, r, d, scale=d**-0.5) if case.shared else None,
        shared_b=rnd(S, d, r, scale=0.1) if case.shared else None,
        expert_mask=mask.to(case.device),
        seg_offsets=torch.tensor(bounds, device=case.device),
    )


def grad_inputs(t: dict) -> list[torch.Tensor]:
    return [v for k, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]


# ---------------------------------------------------------------------------------------------------- providers
def base_layer(case: Case, t: dict) -> Callable:
    return lambda: t["x"] @ t["w0"].T


def backend_layer(name: str) -> Callable:
    def build(case: Case, t: dict) -> Callable:
        def layer():
            delta, _, _ = mole_lora(
                t["x"],
                t["seg_offsets"],
                t["lora_a"],
                t["lora_b"],
                t["router"],
                t["shared_a"],
                t["shared_b"],
                t["expert_mask"],
                top_k=case.top_k,
                scaling=2.0,
                backend=name,
            )
            return t["x"] @ t["w0"].T + delta

        return layer

    return build


def dense_delta(x, lora_a, lora_b, router, shared_a, shared_b, mask, top_k: int, scaling: float):
    """Reference-like dense formulation batched over equal-size segments: x [S, n, d] -> delta [S, n, d_out]."""
    h = torch.einsum("snd,serd->sner", x, lora_a)
    t = torch.einsum("snd,srd->snr", x, router)
    z = (h * t[:, :, None]).sum(-1) / math.sqrt(lora_a.shape[2])
    p = torch.softmax(z.float().masked_fill(~mask[:, None], float("-inf")), -1)
    vals, idx = p.topk(min(top_k, lora_a.shape[1]), -1)
    gates = torch.zeros_like(p).scatter(-1, idx, vals / vals.sum(-1, keepdim=True)) * scaling
    out = torch.einsum("sner,seor->sno", h * gates[..., None].to(h.dtype), lora_b)
    if shared_a is not None:
        out = out + scaling * torch.einsum("snr,sor->sno", torch.einsum("snd,srd->snr", x, shared_a), shared_b)
    return out


def compiled_layer(case: Case, t: dict) -> Callable:
    if case.tokens % case.segments:
        raise ValueError("the dense torch.compile provider needs equal-size segments")
    fn = torch.compile(dense_delta)
    S = case.segments

    def layer():
        xs = t["x"].view(S, -1, case.d)
        delta = fn(
            xs, t["lora_a"], t["lora_b"], t["router"], t["shared_a"], t["shared_b"], t["expert_mask"], case.top_k, 2.0
        )
        return t["x"] @ t["w0"].T + delta.reshape(case.tokens, -1)

    return layer


def authors_loop_layer(case: Case, t: dict) -> Callable:
    """As the authors' MoLE layer: one client at a time, dense routing, then a Python loop over experts on the
    tokens routed to each (index_select / index_add), with the host syncs that implies."""
    bounds = t["seg_offsets"].tolist()
    active = [t["expert_mask"][s].nonzero().flatten().tolist() for s in range(case.segments)]

    def layer():
        x, y = t["x"], t["x"] @ t["w0"].T
        outs = []
        for s in range(case.segments):
            xs = x[bounds[s] : bounds[s + 1]]
            a, b = t["lora_a"][s], t["lora_b"][s]
            h = torch.stack([xs @ a[e].T for e in active[s]], 1)
            z = (h * (xs @ t["router"][s].T)[:, None]).sum(-1) / math.sqrt(case.rank)
            w, idx = torch.softmax(z.float(), -1).topk(min(case.top_k, len(active[s])), -1)
            w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
            out = 2.0 * (xs @ t["shared_a"][s].T) @ t["shared_b"][s].T if case.shared else torch.zeros_like(xs)
            for j, e in enumerate(active[s]):
                tok, slot = torch.where(idx == j)
                if tok.numel():
                    part = (xs[tok] @ a[e].T) @ b[e].T
                    out = out.index_add(0, tok, 2.0 * w[tok, slot, None] * part)
            outs.append(out)
        return y + torch.cat(outs)

    return layer


@dataclass(frozen=True)
class Provider:
    available: Callable[[str], bool]
    build: Callable[[Case, dict], Callable]


def _backend_available(name: str) -> Callable[[str], bool]:
    return lambda device: name in available_backends(device)


PROVIDERS: dict[str, Provider] = {
    "base": Provider(lambda device: True, base_layer),
    "reference": Provider(_backend_available("reference"), backend_layer("reference")),
    "compile": Provider(lambda device: True, compiled_layer),
    "authors_loop": Provider(lambda device: True, authors_loop_layer),
    "triton": Provider(_backend_available("triton"), backend_layer("triton")),
    "cuda": Provider(_backend_available("cuda"), backend_layer("cuda")),
    "cpu": Provider(_backend_available("cpu"), backend_layer("cpu")),
}


# ------------------------------------------------------------------------------------------------------- timing
def median_ms(fn: Callable, device: str, reps: int) -> float:
    """GPU: triton.testing.do_bench median; CPU: median of `reps` wall-clock runs after two warm-ups."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    fn()  # torch.compile may specialise again on the second call
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed_fns(layer: Callable, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Callable]]:
    y = layer()
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return y, {
        "fwd": layer,
        "bwd": lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(layer(), inputs, gy),
    }


def run(cases: list[Case], providers: list[str], modes: list[str], reps: int) -> list[dict]:
    rows = []
    for case in cases:
        t = make_tensors(case)
        base_ms, ref_y = {}, None
        for name in ["base"] + [p for p in providers if p != "base"]:
            prov = PROVIDERS[name]
            if not prov.available(case.device):
                continue
            try:
                layer = prov.build(case, t)
                inputs = [t["x"]] if name == "base" else grad_inputs(t)
                y, fns = timed_fns(layer, inputs)
                # Every provider computes the same layer: report its deviation from the reference backend.
                if name == "reference":
                    ref_y = y.detach().float()
                err = float("nan") if ref_y is None or name == "base" else (y.detach().float() - ref_y).abs().max()
                for mode in modes:
                    ms = median_ms(fns[mode], case.device, reps)
                    if name == "base":
                        base_ms[mode] = ms
                    rows.append(
                        dict(
                            case.__dict__,
                            dtype=str(case.dtype).replace("torch.", ""),
                            provider=name,
                            mode=mode,
                            ms=round(ms, 4),
                            ratio=round(ms / base_ms[mode], 3),
                            max_err=float(f"{float(err):.3g}"),
                        )
                    )
                    print(
                        f"{case.tokens:>6} d={case.d:<5} E={case.slots}/{case.active} r={case.rank:<3} "
                        f"S={case.segments:<3} {mode:<8} {name:<13} {ms:9.3f} ms  x{rows[-1]['ratio']:.2f}  "
                        f"err {float(err):.2g}",
                        flush=True,
                    )
            except Exception as exc:  # one provider failing (e.g. no C compiler for torch.compile) is reported
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            if case.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{os.cpu_count()}core" + ("-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(rows: list[dict], out_dir: Path, device: str) -> Path:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{device_name(device)}-{dt.date.today().isoformat()}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, Path(f"{stem}.png"))
    return Path(f"{stem}.csv")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    shapes = list(dict.fromkeys((r["tokens"], r["d"], r["rank"], r["segments"]) for r in rows))
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(6, 0.9 * len(shapes) * len(providers) / 3), 3.2 * len(modes)), squeeze=False
    )
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(providers):
            vals = {
                (r["tokens"], r["d"], r["rank"], r["segments"]): r["ratio"]
                for r in rows
                if r["mode"] == mode and r["provider"] == prov
            }
            xs = [j + i * width for j, s in enumerate(shapes) if s in vals]
            ax.bar(xs, [vals[s] for s in shapes if s in vals], width, label=prov)
        ax.axhline(1.10, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{mode}: time / base")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"T{t}\nd{d} r{r}\nS{s}" for t, d, r, s in shapes], fontsize=7)
    axes[0, 0].legend(fontsize=7, ncol=len(providers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run with the Triton interpreter (CI)")
    ap.add_argument("--preset", choices=["gpu", "cpu"], default=None, help="shape grid (default: by device)")
    ap.add_argument("--providers", default=None, help="comma-separated subset of " + ",".join(PROVIDERS))
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--d", default=None, help="comma-separated model dims (override the preset)")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--rank", default=None)
    ap.add_argument("--segments", default=None)
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions (median)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; smoke: tmp)")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    ints = lambda s, default: [int(v) for v in s.split(",")] if s else default  # noqa: E731
    if args.smoke:
        base = Case(64, 48, 4, 3, 8, 2, dtype=torch.float32, device="cpu")
        grid = dict(tokens=[64], d=[48], rank=[8], segments=[2])
        # torch.compile is left out: inductor's CPU compile alone takes longer than the smoke budget.
        providers = ["base", "reference", "authors_loop", "triton", "cpu"]
        args.reps = min(args.reps, 3)
    elif (args.preset or ("gpu" if device == "cuda" else "cpu")) == "cpu":
        base = Case(2048, 1024, 6, 6, 8, 1, dtype=torch.float32, device=device)
        grid = dict(tokens=[2048], d=[1024], rank=[8], segments=[1])
        providers = ["base", "reference", "compile", "authors_loop", "cpu", "triton", "cuda"]
    else:
        base = Case(2048, 2048, 8, 6, 8, 1, dtype=torch.bfloat16, device=device)
        grid = dict(tokens=[2048, 8192, 16384], d=[2048, 4096], rank=[8, 16], segments=[1, 8, 32])
        providers = list(PROVIDERS)
    grid = {k: ints(getattr(args, k), v) for k, v in grid.items()}
    if args.providers:
        providers = args.providers.split(",")
    cases = [
        replace(base, tokens=t, d=d, rank=r, segments=s)
        for d, t, r, s in itertools.product(grid["d"], grid["tokens"], grid["rank"], grid["segments"])
    ]
    t0 = time.time()
    rows = run(cases, providers, args.modes.split(","), args.reps)
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench_mole_")) if args.smoke else RESULTS)
    print(f"wrote {write_results(rows, out, device)} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
