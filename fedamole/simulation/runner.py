"""The simulation loop: rounds of client tasks -> engine -> results -> screening -> aggregation, with metrics and
traffic."""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedamole.atomic_io import atomic_write
from fedamole.config import MoLEConfig
from fedamole.fl.client import state_nbytes
from fedamole.fl.engine import make_engine
from fedamole.fl.prompt_baselines import adapter_state_dict, load_adapter_state_dict
from fedamole.fl.protocol import DROPPED, FAILED, ClientResult, ClientTask
from fedamole.simulation.checkpoint import check_resume_state, load_checkpoint, save_checkpoint
from fedamole.simulation.presets import SimConfig, build_data, build_workload, make_algorithm, mole_config
from fedamole.simulation.reporting import (
    RoundReporter,
    best_round,
    plot_assignments,
    plot_communication,
    to_json,
    write_comparison,
    write_per_client_table,
    write_text_atomic,
)
from fedamole.simulation.validation import (
    TRAINING_FAULTS,
    UPLOAD_FAULTS,
    check_metric,
    check_round,
    check_upload,
    corrupt_upload,
)

__all__ = ["AllClientsFailed", "engine_options", "simulate", "write_summary", "plot_history", "compare"]


class AllClientsFailed(RuntimeError):
    """Every client failed while no client had yet worked in this run: the error is systematic (a bad backend, model
    or setting), not a fault to ride out, so the run stops with the first client's error."""


def _mean(values) -> float | None:
    """Mean of the numbers in `values` (None and NaN: not scored); None when there are none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _stop_if_nothing_ever_worked(results: list, worked: bool, what: str) -> bool:
    """True when some client returned a result (failed or dropped do not count) now or earlier in the run; raises
    `AllClientsFailed` when none ever has and some client failed now."""
    if worked or any(isinstance(u, ClientResult) and u.ok for u in results):
        return True
    failures = [(c, u.error) for c, u in enumerate(results) if isinstance(u, ClientResult) and u.status == FAILED]
    if failures:
        c, error = failures[0]
        raise AllClientsFailed(
            f"every client failed in {what} and none has worked in this run; first error (client {c}): {error}"
        )
    return False


def _eval_metrics(results: list[ClientResult]) -> tuple[list[float | None], list[dict]]:
    """Per-client metrics of an evaluation-only run (None: failed or not a valid metric) and its failures."""
    metrics, failures = [], []
    for c, result in enumerate(results):
        if not isinstance(result, ClientResult) or not result.ok:
            error = result.error if isinstance(result, ClientResult) else f"returned a {type(result).__name__}"
            failures.append({"client": c, "error": str(error or "dropped out")})
            metrics.append(None)
        elif problem := check_metric(result.metric):
            failures.append({"client": c, "error": problem})
            metrics.append(None)
        else:
            metrics.append(float(result.metric))
    return metrics, failures


def _settings(cfg: SimConfig, payloads: list[ClientTask], round_idx: int) -> list[ClientTask]:
    """The tasks with the run's local-training settings wherever the algorithm left them unset."""
    lr = cfg.lr * cfg.lr_decay ** (round_idx - 1)
    return [
        p.with_settings(steps=cfg.local_steps, lr=lr, batch_size=cfg.batch_size, max_grad_norm=cfg.max_grad_norm)
        for p in payloads
    ]


def _eval_only(payloads: list[ClientTask]) -> list[ClientTask]:
    return [dataclasses.replace(p, steps=0, evaluate=True, stats=False, upload=(), keep=()) for p in payloads]


def _screen(
    raw: list[ClientResult], payloads: list[ClientTask], max_norm: float | None, norm_ratio: float | None
) -> tuple[list[ClientResult | None], dict]:
    """Accepted uploads (None for a client that failed, dropped out or sent a rejected upload) and the report."""
    uploads: list[ClientResult | None] = []
    report: dict = {"participants": 0, "failed_clients": [], "dropped_clients": [], "rejected_uploads": []}
    rejected: dict[int, list[str]] = {}
    for c, (upload, payload) in enumerate(zip(raw, payloads)):
        if isinstance(upload, ClientResult) and upload.status == DROPPED:
            report["dropped_clients"].append(c)
            uploads.append(None)
        elif isinstance(upload, ClientResult) and upload.status == FAILED:
            report["failed_clients"].append({"client": c, "error": str(upload.error)})
            uploads.append(None)
        elif problems := check_upload(upload, payload, max_norm):
            rejected[c] = problems
            uploads.append(None)
        else:
            uploads.append(upload)
    for c, problems in check_round(uploads, payloads, norm_ratio).items():
        rejected[c] = problems
        uploads[c] = None
    report["rejected_uploads"] = [{"client": c, "reasons": rejected[c][:5]} for c in sorted(rejected)]
    report["participants"] = sum(u is not None for u in uploads)
    return uploads, report


def _down_bytes(payloads: list[ClientTask]) -> int:
    return sum(state_nbytes(p.down) + state_nbytes(p.expert_ids or {}) for p in payloads)


def simulate(
    cfg: SimConfig, progress: bool = True, checkpoint_dir: str | Path | None = None, resume: bool = False, on_round=None
) -> dict:
    """Run one simulation; returns the summary (see `write_summary`).

    `on_round(summary_so_far, history)` is called after every round, once the round is checkpointed (e.g.
    `fedamole.simulation.reporting.RoundReporter`, which prints a line and keeps DIR/metrics.jsonl).

    With `checkpoint_dir`, the complete state is checkpointed there after every round
    (`fedamole.simulation.checkpoint`); with `resume=True` as well, the run continues from the last complete round
    found there (a run killed at any point and resumed ends exactly as an uninterrupted one would).
    """
    cfg.validate()
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _simulate(cfg, progress, None if checkpoint_dir is None else Path(checkpoint_dir), resume, on_round)
    finally:
        torch.set_num_threads(threads)


# Settings that may change between a run and its resumption without changing its results.
_RESUMABLE_CHANGES = (
    "engine", "cohort_size", "max_memory_gb", "cohort_tokens", "ray", "threads", "device", "rounds", "eval_initial"
)  # fmt: skip


def _restore(checkpoint_dir: Path, cfg: SimConfig, algo, workload) -> tuple[int, dict, list]:
    """State of the last complete round in `checkpoint_dir` -> (rounds done, summary so far, history)."""
    loaded = load_checkpoint(checkpoint_dir)
    if loaded is None:
        return 0, {}, []
    done, state = loaded
    if done > cfg.rounds:
        raise ValueError(f"rounds (--rounds) is {cfg.rounds}, but {checkpoint_dir} already holds {done} rounds")
    reference = {
        "config": cfg.to_dict(),
        "algorithm": algo.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "model": adapter_state_dict(workload.model),
        "summary": {},
        "history": [],
    }
    check_resume_state(done, state, reference)
    saved, now = state["config"], cfg.to_dict()
    differing = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differing:
        raise ValueError(
            f"cannot resume from {checkpoint_dir}: the configuration differs in {differing} "
            f"(saved { {k: saved.get(k) for k in differing} })"
        )
    algo.load_state_dict(state["algorithm"])  # checks the state's invariants (`Algorithm.check_state`)
    load_adapter_state_dict(workload.model, state["model"])
    torch.set_rng_state(state["torch_rng"])
    return done, state["summary"], state["history"]


def engine_options(cfg: SimConfig, model_config: MoLEConfig) -> dict:
    """The options of `cfg.engine` (see `fedamole.fl.engine.make_engine`): cohort size and memory, Ray settings, and for
    engines that build models elsewhere (Ray actors) how to: `build_workload(scenario)` and `build_data()`, module
    functions bound to the configuration (picklable). build_workload is seeded, so every copy starts from the same
    backbone."""
    return {
        "cohort_size": int(cfg.cohort_size),
        "max_memory": None if cfg.max_memory_gb is None else cfg.max_memory_gb * 2**30,
        "cohort_tokens": cfg.cohort_tokens,
        "ray": dict(cfg.ray),
        "threads": cfg.threads,
        "device": cfg.device,
        "build_workload": functools.partial(build_workload, cfg, model_config),
        "build_data": functools.partial(build_data, cfg),
    }


def _build(cfg: SimConfig, progress: bool):
    """(scenario, algorithm, workload, engine) of a run, the algorithm set up on the workload's model."""
    scenario = build_data(cfg)
    algo = make_algorithm(cfg)
    model_config = algo.mole_config(mole_config(cfg))
    workload = build_workload(cfg, model_config, scenario)
    # Engines in this process share `workload`; remote ones (Ray actors) rebuild it (see `engine_options`).
    engine = make_engine(
        cfg.engine, lambda: workload, scenario, cfg.seed, progress=progress, **engine_options(cfg, model_config)
    )
    algo.setup(workload.model, [len(c.train) for c in scenario.clients], cfg.seed)
    return scenario, algo, workload, engine


def _initial_summary(cfg: SimConfig, scenario) -> dict:
    summary: dict = {
        "algorithm": cfg.algorithm,
        "engine": cfg.engine,
        "clients": cfg.clients,
        "rounds": cfg.rounds,
        "metric": scenario.metric,
        "scenario": scenario.name,
        "seed": cfg.seed,
        "train_sizes": [len(c.train) for c in scenario.clients],
        "test_sizes": [len(c.test) for c in scenario.clients],
    }
    if scenario.kind == "classification":
        summary["chance"] = 1.0 / (len(scenario.choices) if scenario.choices else scenario.num_labels)
    return summary


def _train_round(cfg: SimConfig, r: int, algo, engine, worked: bool) -> tuple[list, dict, int, int, bool]:
    """Round `r`'s local training with the configured faults, screened: (uploads, report, bytes up, bytes down,
    worked)."""
    payloads = _settings(cfg, algo.payloads(r), r)
    faults = {f["client"]: f["kind"] for f in cfg.faults if f["round"] == r}
    for c, kind in faults.items():
        if kind in TRAINING_FAULTS:
            payloads[c] = dataclasses.replace(payloads[c], fault=kind)
    bytes_down = _down_bytes(payloads)
    raw = engine.run(payloads, r)
    for c, kind in faults.items():
        if kind in UPLOAD_FAULTS and raw[c].ok:
            raw[c] = corrupt_upload(raw[c], kind, payloads[c])
    worked = _stop_if_nothing_ever_worked(raw, worked, f"round {r}")
    uploads, report = _screen(raw, payloads, cfg.max_upload_norm, cfg.upload_norm_ratio)
    received = [u for u in uploads if u is not None]
    bytes_up = sum(state_nbytes(u.up) + state_nbytes(u.stats or {}) for u in received)
    bytes_up += sum(state_nbytes(u.expert_ids or {}) for u in received)  # clients send their ids
    return uploads, report, bytes_up, bytes_down, worked


def _run_round(cfg: SimConfig, r: int, algo, engine, worked: bool) -> tuple[dict, bool]:
    """One round (train, screen, aggregate, evaluate) -> (its history entry, worked)."""
    t_round = time.perf_counter()
    uploads, report, bytes_up, bytes_down, worked = _train_round(cfg, r, algo, engine, worked)
    algo.aggregate(r, uploads)
    if algo.evaluates_global:
        evals = algo.eval_payloads()
        if r == cfg.rounds:  # earlier rounds: this model is the next round's download, counted there
            bytes_down += _down_bytes(evals)
        per_client, report["eval_failures"] = _eval_metrics(engine.run(_eval_only(_settings(cfg, evals, r)), r))
    else:
        per_client = [None if u is None else u.metric for u in uploads]
    entry = {
        "round": r,
        "mean": _mean(per_client),
        "per_client": per_client,
        "bytes_up": int(bytes_up),
        "bytes_down": int(bytes_down),
        "seconds": time.perf_counter() - t_round,
        "train_loss": _mean([u.train_loss for u in uploads if u is not None]),
        **report,
    }
    if hasattr(algo, "experts_per_client"):
        counts = np.array(list(algo.experts_per_client().values()))
        entry["experts_per_client_mean"] = counts.mean(0).round(3).tolist()
    if getattr(algo, "history_assign", None):  # the assignment this round trained with, averaged over modules
        share = np.mean([m.astype(float) for m in algo.history_assign[-1].values()], axis=0)
        entry["assignment_share"] = share.round(3).tolist()
    return entry, worked


def _checkpoint_state(cfg: SimConfig, algo, workload, summary: dict, history: list) -> dict:
    return {
        "config": cfg.to_dict(),
        "algorithm": algo.state_dict(),
        "model": adapter_state_dict(workload.model),
        "torch_rng": torch.get_rng_state(),
        "summary": {k: v for k, v in summary.items() if k.startswith("initial_")},
        "history": history,
    }


def _final_summary(cfg: SimConfig, summary: dict, history: list, t0: float) -> dict:
    summary.update(
        {
            "final_mean": history[-1]["mean"],
            "final_per_client": history[-1]["per_client"],
            "history": history,
            "wall_seconds": time.perf_counter() - t0,
            # Peak resident memory of this process so far (Linux reports KiB): what a cohort's size costs.
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "config": cfg.to_dict(),
        }
    )
    best = best_round(summary)
    summary.update({"best_mean": best.mean, "best_round": best.round})
    return summary


def _simulate(cfg: SimConfig, progress: bool, checkpoint_dir: Path | None, resume: bool, on_round) -> dict:
    t0 = time.perf_counter()
    scenario, algo, workload, engine = _build(cfg, progress)
    summary = _initial_summary(cfg, scenario)
    done, restored, history = _restore(checkpoint_dir, cfg, algo, workload) if resume else (0, {}, [])
    summary.update({k: v for k, v in restored.items() if k.startswith("initial_")})
    # Whether any client has returned a result in this run (see `_stop_if_nothing_ever_worked`).
    worked = any(h["participants"] or h["rejected_uploads"] for h in history)
    try:
        if cfg.eval_initial and done == 0:
            first = engine.run(_eval_only(_settings(cfg, algo.payloads(1), 1)), 0)
            worked = _stop_if_nothing_ever_worked(first, worked, "the initial evaluation")
            summary["initial_per_client"], summary["initial_failures"] = _eval_metrics(first)
            summary["initial_mean"] = _mean(summary["initial_per_client"])
        for r in tqdm(
            range(done + 1, cfg.rounds + 1),
            desc=f"{cfg.algorithm} rounds",
            disable=not progress,
            initial=min(done, cfg.rounds),
            total=cfg.rounds,
        ):
            entry, worked = _run_round(cfg, r, algo, engine, worked)
            history.append(entry)
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, r, _checkpoint_state(cfg, algo, workload, summary, history))
            if on_round is not None:
                on_round(summary, history)
    finally:
        engine.close()
    if getattr(engine, "report", None) is not None:
        summary["engine_report"] = engine.report
    return _final_summary(cfg, summary, history, t0)


def plot_history(summaries: dict[str, dict], path: str | Path, per_client: bool = True) -> Path:
    """Mean metric per round (thick) and, for a single run, each client's metric (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, s in summaries.items():
        rounds = [h["round"] for h in s["history"]]
        means = np.array([h["mean"] for h in s["history"]], dtype=float)  # None (nothing scored) -> NaN: a gap
        (line,) = ax.plot(rounds, means, marker="o", lw=2.2, label=f"{label} (mean)")
        if per_client and len(summaries) == 1:
            per = np.array([h["per_client"] for h in s["history"]], dtype=float)
            for c in range(per.shape[1]):
                ax.plot(rounds, per[:, c], lw=0.8, alpha=0.45, color=line.get_color())
        if s.get("initial_mean") is not None:
            ax.axhline(s["initial_mean"], ls=":", color=line.get_color(), lw=1)
    first = next(iter(summaries.values()))
    if "chance" in first:
        ax.axhline(first["chance"], ls="--", color="grey", lw=1, label="chance")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(first["metric"])
    ax.set_title(f"{first.get('scenario', '')}: {first['clients']} clients (thin: per client, dotted: untrained)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def write_summary(summary: dict, out_dir: str | Path) -> Path:
    """DIR/summary.json (strict JSON: missing values are null), DIR/metrics.png (metric per round), DIR/per_client.csv
    (sizes and metrics per client), DIR/communication.png and, for runs with experts, DIR/assignment.png (experts x
    clients per round); the summary is written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.json", to_json(summary))
    plot_history({summary["algorithm"]: summary}, out / "metrics.png")
    write_per_client_table(summary, out / "per_client.csv")
    plot_communication(summary, out / "communication.png")
    plot_assignments(summary, out / "assignment.png")
    return out / "summary.json"


def compare(
    cfg: SimConfig, algorithms: list[str], out_dir: str | Path, seeds: list[int] | None = None, progress: bool = True
) -> dict:
    """Run several algorithms (and seeds) on one scenario; writes per-run folders (DIR/<algorithm>-seed<s>/: the
    per-round line and metrics.jsonl as `simulate` writes them, then the summary and plots),
    compare.json and compare.md (final-round and best-round client means, mean +- std over seeds) and compare.png
    (mean over seeds per round with a +-std band; its last point is the table's final mean)."""
    out = Path(out_dir)
    runs: dict[str, list[dict]] = {}
    for algo in algorithms:
        for seed in seeds or [cfg.seed]:
            run_dir = out / f"{algo}-seed{seed}"
            summary = simulate(
                dataclasses.replace(cfg, algorithm=algo, seed=seed), progress=progress, on_round=RoundReporter(run_dir)
            )
            write_summary(summary, run_dir)
            runs.setdefault(algo, []).append(summary)
    return write_comparison(runs, out)[0]
