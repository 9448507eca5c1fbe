"""Roofline of the adapted layer's Triton path on an H100 SXM, from shapes alone (no GPU).

For every launch of a training forward + backward (`triton_launches.py`: the MoLE kernels and the layer glue around
them), its FLOPs and compulsory HBM bytes and the time bound max(FLOPs / 989 TFLOP/s bf16 dense, bytes / 3.35 TB/s),
summed, against the frozen base linear's bound (forward GEMM + input-gradient GEMM, bf16). The predicted ratio
(base + MoLE) / base is compared with the SPEC's 1.10x target and the kernel that dominates the MoLE time is named.

A bound, not a prediction: it ignores launch latency (~2-4 us per launch, listed as `launches`, which dominates at
small T), tile quantisation and the padding of K up to the tile sizes; real kernels reach maybe 60-80 % of it.

    python benchmarks/roofline.py            # reference setup + SPEC grid -> results/roofline-h100-<date>.*
    python benchmarks/roofline.py --no-write # print the tables only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from triton_launches import REFERENCE, Problem, base_launches, grid_problems, layer_launches  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM, bf16 dense tensor cores
PEAK_BYTES = 3.35e12  # H100 SXM HBM3
TARGET = 1.10
RESULTS = ROOT / "benchmarks" / "results"


def bound_us(flops: float, nbytes: float) -> float:
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e6


def analyse(p: Problem) -> dict:
    launches = [
        {"name": la.name, "kernel": la.kernel, "glue": la.glue, "flops": la.flops, "bytes": la.bytes,
         "bound_us": bound_us(la.flops, la.bytes), "limit": "compute" if la.flops / PEAK_FLOPS > la.bytes / PEAK_BYTES
         else "memory"}
        for la in layer_launches(p)
    ]  # fmt: skip
    base = sum(bound_us(la.flops, la.bytes) for la in base_launches(p))
    mole = sum(la["bound_us"] for la in launches)
    kernels = sum(la["bound_us"] for la in launches if not la["glue"])
    top = max(launches, key=lambda la: la["bound_us"])
    return {
        "T": p.T, "S": p.S, "E": p.E, "r": p.r, "d": p.d_in, "dropout": p.dropout,
        "launches": len(launches), "triton_launches": sum(la["kernel"].startswith("_") for la in launches),
        "base_us": base, "mole_us": mole, "mole_kernels_us": kernels, "ratio": (base + mole) / base,
        "ratio_kernels_only": (base + kernels) / base, "meets_target": (base + mole) / base <= TARGET,
        "dominant": top["name"], "dominant_share": top["bound_us"] / mole, "per_launch": launches,
    }  # fmt: skip


def launch_table(res: dict) -> str:
    out = [
        f"Reference setup T={res['T']} d={res['d']} E={res['E']} r={res['r']} S={res['S']} dropout={res['dropout']}",
        "| launch | GFLOP | MB | bound (us) | limit |",
        "|---|---|---|---|---|",
    ]
    for la in res["per_launch"]:
        out.append(f"| {la['name']} | {la['flops'] / 1e9:.2f} | {la['bytes'] / 1e6:.2f} | {la['bound_us']:.2f} | "
                   f"{la['limit']} |")  # fmt: skip
    out.append(f"| **MoLE total** ({res['launches']} launches, {res['triton_launches']} Triton) | | | "
               f"**{res['mole_us']:.1f}** | |")  # fmt: skip
    out.append(f"| **base linear** (fwd + input grad) | | | **{res['base_us']:.1f}** | |")
    out.append(f"\npredicted (base + MoLE) / base = **{res['ratio']:.3f}x** (MoLE kernels without glue: "
               f"{res['ratio_kernels_only']:.3f}x) vs the {TARGET:.2f}x target; dominated by {res['dominant']} "
               f"({100 * res['dominant_share']:.0f} % of the MoLE bound)")  # fmt: skip
    return "\n".join(out)


def grid_table(results: list[dict]) -> str:
    out = ["| T | S | E | r | dropout | base (us) | MoLE (us) | ratio | <= 1.10 | dominant launch |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        out.append(f"| {res['T']} | {res['S']} | {res['E']} | {res['r']} | {int(res['dropout'])} | "
                   f"{res['base_us']:.2f} | {res['mole_us']:.2f} | {res['ratio']:.3f} | "
                   f"{'yes' if res['meets_target'] else 'no'} | {res['dominant'].split(' (')[0]} |")  # fmt: skip
    return "\n".join(out)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def write(reference: dict, grid: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"roofline-h100-{dt.date.today().isoformat()}"
    meta = {"commit": _commit(), "device": "H100 SXM (analytic)", "peak_flops_bf16": PEAK_FLOPS,
            "peak_bytes_per_s": PEAK_BYTES, "target": TARGET}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps({**meta, "reference": reference, "grid": grid}, indent=1) + "\n")
    cols = ["T", "S", "E", "r", "d", "dropout", "launches", "triton_launches", "base_us", "mole_us",
            "mole_kernels_us", "ratio", "meets_target", "dominant"]  # fmt: skip
    lines = ["# " + " ".join(f"{k}={v}" for k, v in meta.items()), "setup," + ",".join(cols)]
    for tag, res in [("reference", reference)] + [("grid", g) for g in grid]:
        cells = [f"{res[c]:.4f}" if isinstance(res[c], float) else str(res[c]) for c in cols]
        lines.append(tag + "," + ",".join(f'"{c}"' if "," in c else c for c in cells))
    stem.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    return stem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    ref = REFERENCE
    reference = analyse(Problem(T=ref["T"], S=ref["S"], E=ref["E"], r=ref["r"], d_in=ref["d"], d_out=ref["d"]))
    grid = [analyse(p) for p in grid_problems() + grid_problems(dropout=False)]
    print(launch_table(reference))
    print()
    print(grid_table(grid))
    if not args.no_write:
        print(f"\nwrote {write(reference, grid, args.out)}.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
