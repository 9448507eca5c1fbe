"""GPU benchmark for the SPEC shapes: the op (kernel level) and the adapted layer, per implementation, bf16.

Implementations (bench_mole.PROVIDERS): base (the frozen linear alone), triton, cuda, compile (dense PyTorch under
torch.compile), reference (dense-ish PyTorch, also the error oracle). Modes: fwd and fwd+bwd, timed with
triton.testing.do_bench (median). Level "layer" times y = x W0^T + delta (ratio = time / base time, the SPEC's 1.10x
target); level "op" times mole_lora alone. Each layer row carries the roofline's predicted ratio for its shape.

    python benchmarks/bench_gpu.py                     # reference setup + SPEC grid -> results/<device>-<date>.*
    python benchmarks/bench_gpu.py --quick             # reference setup only
    python benchmarks/bench_gpu.py --list              # print the shape table and exit (no GPU needed)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from triton_launches import GRID, REFERENCE, Problem  # noqa: E402

PROVIDERS = ("base", "triton", "cuda", "compile", "reference")
MODES = ("fwd", "fwd+bwd")


def shapes(quick: bool = False, limit: int | None = None) -> list[dict]:
    """The reference setup first, then the SPEC grid (T, E, r, S at d = 4096; S <= T), largest T first."""
    out = [dict(REFERENCE, tag="reference")]
    if not quick:
        for t in sorted(GRID["T"], reverse=True):
            for e in GRID["E"]:
                for r in GRID["r"]:
                    for s in GRID["S"]:
                        if s <= t:
                            out.append(dict(T=t, d=GRID["d"][0], E=e, r=r, S=s, tag="grid"))
    return out[:limit] if limit else out


def predicted_ratio(shape: dict) -> float:
    from roofline import analyse

    d = shape["d"]
    p = Problem(T=shape["T"], S=shape["S"], E=shape["E"], r=shape["r"], d_in=d, d_out=d, dropout=False)
    return round(analyse(p)["ratio"], 3)


def op_rows(case, providers: list[str], modes: list[str]) -> list[dict]:
    """mole_lora alone (no base GEMM), per backend."""
    import bench_mole
    import triton.testing

    from fedamole_kernels import available_backends, mole_lora

    t = bench_mole.make_tensors(case)
    rows = []
    for name in [p for p in providers if p in ("triton", "cuda") and p in available_backends("cuda")]:
        args = [t[k] for k in ("x", "seg_offsets", "lora_a", "lora_b", "router", "shared_a", "shared_b", "expert_mask")]

        def op(name=name, args=args):
            return mole_lora(*args, top_k=case.top_k, scaling=2.0, backend=name)[0]

        delta = op()
        gd = torch.randn_like(delta)
        inputs = bench_mole.grad_inputs(t)
        fns = {"fwd": op, "fwd+bwd": lambda op=op, i=inputs, g=gd: torch.autograd.grad(op(), i, g)}
        for mode in modes:
            ms = float(triton.testing.do_bench(fns[mode], warmup=25, rep=100, return_mode="median"))
            rows.append(dict(case.__dict__, dtype="bfloat16", level="op", provider=name, mode=mode, ms=round(ms, 4)))
            print(f"op    T={case.tokens} E={case.slots} r={case.rank} S={case.segments} {mode:8s} {name:8s} "
                  f"{ms:8.3f} ms", flush=True)  # fmt: skip
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def write(rows: list[dict], meta: dict, out_dir: Path) -> Path:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{meta['device_slug']}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    fields = sorted({k for row in rows for k in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        f.write("# " + " ".join(f"{k}={v}" for k, v in meta.items()) + "\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the reference setup only")
    ap.add_argument("--limit", type=int, default=None, help="first N shapes only")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--levels", default="op,layer")
    ap.add_argument("--list", action="store_true", help="print the shapes and exit")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = shapes(args.quick, args.limit)
    if args.list:
        for s in table:
            print(json.dumps(s))
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine")
    import bench_mole

    providers, modes, levels = args.providers.split(","), args.modes.split(","), args.levels.split(",")
    rows = []
    for shape in table:
        case = bench_mole.Case(shape["T"], shape["d"], shape["E"], shape["E"], shape["r"], shape["S"])
        if "op" in levels:
            rows += [dict(r, tag=shape["tag"]) for r in op_rows(case, providers, modes)]
        if "layer" in levels:
            pred = predicted_ratio(shape)
            for r in bench_mole.run([case], providers, modes, reps=1):
                rows.append(dict(r, level="layer", tag=shape["tag"], roofline_ratio=pred))
        torch.cuda.empty_cache()
    meta = {
        "commit": _commit(), "device": torch.cuda.get_device_name(), "device_slug": bench_mole.device_name("cuda"),
        "torch": torch.__version__, "triton": __import__("triton").__version__, "dtype": "bfloat16",
        "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)",
    }  # fmt: skip
    print(f"wrote {write(rows, meta, args.out)}.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
