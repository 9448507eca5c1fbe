"""Where a cohort training step's time goes: `torch.profiler` over the local steps of one MiniLM cohort.

Builds the default preset at 32 clients (40 experts, as `bench_simulation.py`'s ``default:32``), stacks the first
``--clients`` clients and runs their 10 local steps twice (the first warms up), profiling the second. With
``--torch-dropout`` the model's dropout is torch's own (`nn.Dropout`, sdpa), as before `fedamole.dropout`. Writes the
op table (self CPU time) and the step time, with the load average before and after, to
benchmarks/results/profile-cohort-step-<date>[-tag].txt::

    python benchmarks/profile_cohort_step.py --clients 8
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from implementations import load_average  # noqa: E402

from fedamole.dropout import FastDropout  # noqa: E402
from fedamole.fl.cohort import _train  # noqa: E402
from fedamole.fl.cohort_stack import ClientStack  # noqa: E402
from fedamole.fl.engine import client_seed  # noqa: E402
from fedamole.simulation.presets import build_data, build_workload, make_algorithm, make_config, mole_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def torch_dropout(model: nn.Module) -> None:
    """Undo `fedamole.dropout.use_fast_dropout` (and the MoLE layers' own): torch's dropout and sdpa attention."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FastDropout):
                setattr(parent, name, nn.Dropout(child.p, child.inplace))
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and module.config._attn_implementation != "sdpa":
            module.set_attn_implementation("sdpa")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-dropout", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config("default", {"clients": 32, "rounds": 1, "fedamole": {"num_experts": 40}})
    scenario, algo = build_data(cfg), make_algorithm(cfg)
    workload = build_workload(cfg, algo.mole_config(mole_config(cfg)), scenario)
    if args.torch_dropout:
        torch_dropout(workload.model)
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    tasks = [
        p.with_settings(steps=cfg.local_steps, lr=cfg.lr, batch_size=cfg.batch_size, max_grad_norm=cfg.max_grad_norm)
        for p in algo.payloads(1)[: args.clients]
    ]
    datas = [scenario.clients[c] for c in range(args.clients)]
    seeds = [client_seed(cfg.seed, 1, c) for c in range(args.clients)]

    def steps() -> float:
        stack = ClientStack(workload.model, [t.state for t in tasks], set(tasks[0].frozen))
        start = time.perf_counter()
        _train(workload, stack, tasks, datas, seeds)
        return time.perf_counter() - start

    load_before = load_average()
    warm = steps()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = steps()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    started = datetime.datetime.now()
    header = (
        f"{started.isoformat(timespec='seconds')}  {args.clients} clients x {cfg.local_steps} steps, "
        f"{args.threads} threads, dropout: {'torch' if args.torch_dropout else 'fedamole'}\n"
        f"steps: {warm:.2f} s (warm-up), {profiled:.2f} s (profiled)  "
        f"load before {load_before} after {load_average()}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (f"profile-cohort-step-{started:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "") + ".txt")
    out.write_text(header + table + "\n")
    print(header + table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
