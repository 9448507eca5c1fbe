"""Dropout on CPU: torch's `F.dropout` vs `fedamole_kernels.dropout.dropout`, side by side in one process.

Times, per call, the mask alone (`torch.empty(...).bernoulli_` vs `keep_mask`), the forward, and forward+backward, on
the tensors a MiniLM cohort step of the default preset drops: [2200, 384] (hidden and expert inputs) and
[46, 12, 48, 48] (attention probabilities), fp32. Interleaved loops, medians of ``--repeat``, load average recorded
before and after. Writes benchmarks/results/dropout-<date>[-tag].json::

    python benchmarks/bench_dropout.py --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import commit  # noqa: E402
from bench_layer_overhead import interleaved_medians  # noqa: E402
from implementations import load_average  # noqa: E402

from fedamole_kernels.dropout import dropout, keep_mask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((2200, 384), (46, 12, 48, 48))


def calls(shape: tuple[int, ...], p: float) -> dict:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    return {
        "torch mask": lambda: torch.empty(shape).bernoulli_(1 - p),
        "fedamole mask": lambda: keep_mask(shape, p),
        "torch forward": lambda: F.dropout(x, p, True),
        "fedamole forward": lambda: dropout(x, p),
        "torch forward+backward": lambda: F.dropout(x, p, True).backward(grad),
        "fedamole forward+backward": lambda: dropout(x, p).backward(grad),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now()
    load_before = load_average()
    rows = []
    for shape in SHAPES:
        medians, n = interleaved_medians(calls(shape, args.p), args.repeat, warmup=3, target_s=0.05)
        for name, seconds in medians.items():
            rows.append({"shape": list(shape), "case": name, "ms": round(seconds * 1e3, 4), "calls_per_loop": n})
        for what in ("mask", "forward", "forward+backward"):
            ratio = medians[f"torch {what}"] / medians[f"fedamole {what}"]
            rows.append({"shape": list(shape), "case": f"speed-up {what}", "ratio": round(ratio, 2)})
    result = {
        "date": started.isoformat(timespec="seconds"),
        "commit": commit(Path(__file__).resolve().parents[1]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "p": args.p,
        "repeat": args.repeat,
        "load_before": load_before,
        "load_after": load_average(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"dropout-{started:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "") + ".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"load_before": load_before, "load_after": result["load_after"]}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
