"""Benchmark of the adapted layer y = W0 x + mole_lora(x) against the frozen base linear y = W0 x alone.

Every provider times the whole layer (base GEMM included), so `ratio` = time / base time is the overhead the
adapter adds (SPEC target for fwd+bwd: <= 1.10). Modes: fwd (training forward), bwd (backward of a recorded
forward), fwd+bwd. Gradients: x and every adapter weight (the base linear: x only).

    python benchmarks/bench_mole.py                       # GPU: the issue's bf16 shape grid
    python benchmarks/bench_mole.py --preset cpu          # CPU: fp32, T=2048, d=1024, 6 experts, r=8, top-2, shared
    TRITON_INTERPRET=1 python benchmarks/bench_mole.py --smoke   # CI: tiny shape, interpreter, < 60 s

Providers come from the shared table benchmarks/implementations.py (IMPLEMENTATIONS: name, available(device),
build(shapes, dtype, device)); adding one (e.g. a new backend) is one entry there and its name in PROVIDERS here.
Results: <out>/<device>-<date>.csv and a .png plot (matplotlib Agg).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from implementations import IMPLEMENTATIONS, Built, Shapes  # noqa: E402

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


def shapes_of(case: Case) -> Shapes:
    return Shapes(
        case.tokens, case.d, case.d, case.slots, case.active, case.rank, case.segments, case.top_k, case.shared
    )


# Providers: the shared table of benchmarks/implementations.py (base, reference, compile, authors_loop, triton,
# cuda, cpu), each timed as the whole layer y = x W0^T + adapter(x).
PROVIDERS = ("base", "reference", "compile", "authors_loop", "triton", "cuda", "cpu")


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


def timed_fns(built: Built) -> tuple[torch.Tensor, dict[str, Callable]]:
    y = built.forward()
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return y, {
        "fwd": built.forward,
        "bwd": lambda: torch.autograd.grad(y, built.grad_inputs, gy, retain_graph=True),
        "fwd+bwd": lambda: built.forward_backward(gy),
    }


def run(cases: list[Case], providers: list[str], modes: list[str], reps: int) -> list[dict]:
    rows = []
    for case in cases:
        base_ms, ref_y = {}, None
        for name in ["base"] + [p for p in providers if p != "base"]:
            impl = IMPLEMENTATIONS[name]
            if not impl.available(case.device):
                continue
            try:
                y, fns = timed_fns(impl.build(shapes_of(case), case.dtype, case.device))
                # Every provider computes the same layer: report its deviation from the reference backend.
                if name == "reference":
                    ref_y = y.detach().float()
                err = float("nan") if ref_y is None or name == "base" else (y.detach().float() - ref_y).abs().max()
                for mode in modes:
                    ms = median_ms(fns[mode], case.device, reps)
                    if name == "base":
                        base_ms[mode] = ms
                    rows.append(result_row(case, name, mode, ms, base_ms[mode], err))
            except Exception as exc:  # one provider failing (e.g. no C compiler for torch.compile) is reported
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            if case.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def result_row(case: Case, name: str, mode: str, ms: float, base_ms: float, err) -> dict:
    row = dict(
        case.__dict__,
        dtype=str(case.dtype).replace("torch.", ""),
        provider=name,
        mode=mode,
        ms=round(ms, 4),
        ratio=round(ms / base_ms, 3),
        max_err=float(f"{float(err):.3g}"),
    )
    print(
        f"{case.tokens:>6} d={case.d:<5} E={case.slots}/{case.active} r={case.rank:<3} "
        f"S={case.segments:<3} {mode:<8} {name:<13} {ms:9.3f} ms  x{row['ratio']:.2f}  err {float(err):.2g}",
        flush=True,
    )
    return row


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
