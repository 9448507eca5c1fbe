"""Checks of every simulation setting (`SimConfig`, YAML files, CLI flags), with messages that say what is wrong
and what is allowed. `check_sim_config(cfg)` raises ValueError on the first problem."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODEL_TYPES = ("minilm", "hf-encoder", "tiny-llama", "hf-causal")
DATA_SOURCES = ("stdlib", "synthetic-cls", "synthetic-gen", "snli", "dolly", "ni")
PARTITIONS = ("dirichlet", "task")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Rule:
    kind: str  # "int", "float", "bool", "str", "choice"
    low: float | None = None  # inclusive lower bound for numbers
    high: float | None = None
    choices: tuple = ()
    optional: bool = False  # None allowed
    strict_low: bool = False  # low is exclusive

    def describe(self) -> str:
        if self.kind == "choice":
            text = f"one of {', '.join(map(str, self.choices))}"
        elif self.kind in ("int", "float"):
            text = f"{'an int' if self.kind == 'int' else 'a number'}"
            if self.low is not None:
                text += f" {'>' if self.strict_low else '>='} {self.low:g}"
            if self.high is not None:
                text += f" and <= {self.high:g}"
        else:
            text = f"a {self.kind}"
        return text + (" (or null)" if self.optional else "")

    def ok(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and bool(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.strict_low and value == self.low)):
            return False
        return self.high is None or value <= self.high


POS_INT, NONNEG_INT, POS_FLOAT = Rule("int", 1), Rule("int", 0), Rule("float", 0, strict_low=True)

TOP_LEVEL = {
    "clients": POS_INT, "rounds": POS_INT, "local_steps": NONNEG_INT, "batch_size": POS_INT,
    "lr": POS_FLOAT, "lr_decay": Rule("float", 0, 1, strict_low=True), "seed": NONNEG_INT,
    "max_grad_norm": Rule("float", 0, strict_low=True, optional=True), "device": Rule("choice", choices=DEVICES),
    "threads": Rule("int", 1, optional=True), "eval_initial": Rule("bool"), "cohort_size": NONNEG_INT,
    "max_upload_norm": Rule("float", 0, strict_low=True, optional=True),
    "upload_norm_ratio": Rule("float", 1, optional=True),
}
SECTIONS = {
    "model": {"type": Rule("choice", choices=MODEL_TYPES), "path": Rule("str", optional=True),
              "dtype": Rule("choice", choices=DTYPES, optional=True), "max_length": POS_INT,
              "max_new_tokens": POS_INT, "hidden_size": POS_INT, "layers": POS_INT, "heads": POS_INT},
    "data": {"source": Rule("choice", choices=DATA_SOURCES), "path": Rule("str", optional=True),
             "partition": Rule("choice", choices=PARTITIONS), "alpha": POS_FLOAT, "min_samples": POS_INT,
             "max_per_client": Rule("int", 1, optional=True), "n": POS_INT, "num_labels": Rule("int", 2),
             "n_per_task": POS_INT, "max_examples": Rule("int", 1, optional=True),
             "max_per_task": Rule("int", 1, optional=True)},
    "fedamole": {"num_experts": Rule("int", 1, optional=True), "clients_per_expert": POS_INT, "min_experts": POS_INT,
                 "max_experts": POS_INT, "dp_eta": Rule("float", 0, strict_low=True, optional=True)},
    "fdlora": {"sync_every": POS_INT, "outer_lr": POS_FLOAT, "outer_momentum": Rule("float", 0, 1)},
    "ray": {"num_actors": POS_INT, "cpus_per_actor": POS_FLOAT, "address": Rule("str", optional=True),
            "gpus_per_actor": Rule("float", 0), "num_cpus": Rule("int", 1, optional=True),
            "threads": Rule("int", 1, optional=True), "rebuild_data": Rule("bool"),
            "kill_actor_after_round": Rule("int", 0, optional=True),
            "crash_actor_in_round": Rule("int", 0, optional=True)},
}


def _check(where: str, value, rule: Rule) -> None:
    if not rule.ok(value):
        raise ValueError(f"{where} must be {rule.describe()}, got {value!r}")


def check_sim_config(cfg) -> None:
    """Raise ValueError naming the first invalid field of `cfg` (a SimConfig) and what it allows."""
    for name, rule in TOP_LEVEL.items():
        _check(name, getattr(cfg, name), rule)
    for section, rules in SECTIONS.items():
        values = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ValueError(f"{section} must be a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(rules))
        if unknown:
            raise ValueError(f"unknown {section} settings {unknown}; allowed: {sorted(rules)}")
        for key, value in values.items():
            _check(f"{section}.{key}", value, rules[key])
    if not isinstance(cfg.mole, dict):
        raise ValueError(f"mole must be a mapping of MoLEConfig fields, got {type(cfg.mole).__name__}")
    from fedamole.config import MoLEConfig

    try:
        MoLEConfig.from_dict(dict(cfg.mole))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mole: {exc}") from exc
    fed = cfg.fedamole
    if fed.get("min_experts", 2) > fed.get("max_experts", 8):
        raise ValueError(f"fedamole.min_experts ({fed.get('min_experts')}) must be <= fedamole.max_experts "
                         f"({fed.get('max_experts')})")
    if cfg.model.get("type") in ("hf-encoder", "hf-causal") and not cfg.model.get("path"):
        raise ValueError(f"model.path is required for model.type {cfg.model['type']!r} (a local folder or hub id)")
