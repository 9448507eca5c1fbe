"""Checks of every simulation setting (`SimConfig`, YAML files, CLI flags), with messages that say what is wrong
and what is allowed. `check_sim_config(cfg)` raises ValueError on the first problem; `load_config_file(path)` reads a
YAML configuration file within fixed bounds (size, nesting, no anchors or aliases)."""

from __future__ import annotations

import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

MODEL_TYPES = ("minilm", "hf-encoder", "tiny-llama", "hf-causal", "smollm2")
DATA_SOURCES = ("stdlib", "synthetic-cls", "synthetic-gen", "snli", "dolly", "ni", "bigbench-ni", "vitaminc")
PARTITIONS = ("dirichlet", "task")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SEED_MAX = 2**32 - 1  # what every seeded library accepts (numpy, torch, Python's random)
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32


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
            fmt = "d" if self.kind == "int" else "g"
            if self.low is not None:
                text += f" {'>' if self.strict_low else '>='} {self.low:{fmt}}"
            if self.high is not None:
                text += f" and <= {self.high:{fmt}}"
        elif self.kind == "str-list":
            text = "a non-empty list of names"
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
        if self.kind == "str-list":
            return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
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
    "clients": POS_INT,
    "rounds": POS_INT,
    "local_steps": NONNEG_INT,
    "batch_size": POS_INT,
    "lr": POS_FLOAT,
    "lr_decay": Rule("float", 0, 1, strict_low=True),
    "seed": Rule("int", 0, SEED_MAX),
    "max_grad_norm": Rule("float", 0, strict_low=True, optional=True),
    "device": Rule("choice", choices=DEVICES),
    "threads": Rule("int", 1, optional=True),
    "eval_initial": Rule("bool"),
    "cohort_size": NONNEG_INT,
    "max_memory_gb": Rule("float", 0, strict_low=True, optional=True),
    "cohort_tokens": Rule("int", 1, optional=True),
    "max_upload_norm": Rule("float", 0, strict_low=True, optional=True),
    "upload_norm_ratio": Rule("float", 1, optional=True),
}
SECTIONS = {
    "model": {
        "type": Rule("choice", choices=MODEL_TYPES),
        "path": Rule("str", optional=True),
        "dtype": Rule("choice", choices=DTYPES, optional=True),
        "max_length": POS_INT,
        "max_new_tokens": POS_INT,
        "hidden_size": POS_INT,
        "layers": POS_INT,
        "heads": POS_INT,
        "decoding": Rule("choice", choices=("greedy", "generation_config")),
        "rouge": Rule("choice", choices=("rouge", "rouge-score")),
        "add_bos": Rule("bool"),
    },
    "data": {
        "source": Rule("choice", choices=DATA_SOURCES),
        "path": Rule("str", optional=True),
        "partition": Rule("choice", choices=PARTITIONS),
        "alpha": POS_FLOAT,
        "min_samples": Rule("int", 4),
        "max_per_client": Rule("int", 4, optional=True),
        "n": POS_INT,
        "num_labels": Rule("int", 2),
        "n_per_task": Rule("int", 4),
        "max_examples": Rule("int", 1, optional=True),
        "max_per_task": Rule("int", 1, optional=True),
        "drop_long": Rule("bool"),
        "candidate_eos": Rule("bool"),
        "balanced": Rule("bool"),
        "task_pool": Rule("int", 1, optional=True),
        "embed_cap": Rule("int", 1, optional=True),
        "eval_cap": Rule("int", 1, optional=True),
        "test_cap": Rule("int", 1, optional=True),
        "tasks": Rule("str-list", optional=True),
    },
    "fedamole": {
        "num_experts": Rule("int", 1, optional=True),
        "clients_per_expert": Rule("int", 1, optional=True),
        "min_experts": POS_INT,
        "max_experts": POS_INT,
        "dp_eta": Rule("float", 0, strict_low=True, optional=True),
        "dp_mechanism": Rule("choice", choices=("gamma-uniform", "metric-sphere")),
    },
    "fdlora": {
        "sync_every": POS_INT,
        "outer_lr": POS_FLOAT,
        "outer_momentum": Rule("float", 0, 1),
        "warmup_round": Rule("bool"),
        "fusion_budget": POS_INT,
        "fusion_bound": POS_FLOAT,
        "fusion_penalty": Rule("float", 0),
        "fusion_batches": POS_INT,
    },
    "baselines": {
        "aggregation": Rule("choice", choices=("mean", "weighted")),
        "prompt_tokens": POS_INT,
        "prompt_init_text": Rule("str", optional=True),
        "ptuning_hidden": POS_INT,
    },
    "ray": {
        "num_actors": POS_INT,
        "cpus_per_actor": POS_FLOAT,
        "address": Rule("str", optional=True),
        "gpus_per_actor": Rule("float", 0),
        "num_cpus": Rule("int", 1, optional=True),
        "threads": Rule("int", 1, optional=True),
        "rebuild_data": Rule("bool"),
        "cohort": Rule("bool"),
        "kill_actor_after_round": Rule("int", 0, optional=True),
        "crash_actor_in_round": Rule("int", 0, optional=True),
    },
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
        raise ValueError(
            f"fedamole.min_experts ({fed.get('min_experts')}) must be <= fedamole.max_experts "
            f"({fed.get('max_experts')})"
        )
    if cfg.model.get("type") in ("hf-encoder", "hf-causal") and not cfg.model.get("path"):
        raise ValueError(f"model.path is required for model.type {cfg.model['type']!r} (a local folder or hub id)")
    top_k = MoLEConfig.from_dict(dict(cfg.mole)).top_k
    if cfg.algorithm.startswith("fedamole") and top_k > fed.get("max_experts", 8):
        raise ValueError(
            f"mole.top_k ({top_k}) must be <= fedamole.max_experts ({fed.get('max_experts', 8)}), the "
            "most experts a client holds"
        )
    check_machine(cfg)


def check_machine(cfg) -> None:
    """Raise ValueError when this machine cannot run `cfg`: `device: cuda` without a usable GPU, or more torch
    threads than CPU cores."""
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device: cuda, but torch finds no usable CUDA GPU here; use device: cpu or auto")
    cores = os.cpu_count() or 1
    for where, value in (("threads", cfg.threads), ("ray.threads", cfg.ray.get("threads"))):
        if value is not None and value > cores:
            raise ValueError(f"{where} ({value}) must be <= the {cores} CPU cores of this machine")


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats (``1e-9`` is a float, not the string YAML 1.1 makes of it) and
    duplicate keys refused (YAML 1.1 silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = Counter(k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode))
        duplicated = sorted(k for k, n in keys.items() if n > 1)
        if duplicated:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicated}", node.start_mark)
        return super().construct_mapping(node, deep)


# An exponent without a dot ("1e-9", "5E3") or without a leading digit (".5e-3"); the other float forms already
# resolve as floats.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _named(text: str, path: Path) -> io.StringIO:
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML error marks quote the stream's name
    return stream


def load_config_file(path: Path) -> dict:
    """The mapping of configuration overrides in the YAML file `path`.

    Raises ValueError naming ``--config`` when the file is missing, larger than 1 MiB, not UTF-8, not valid YAML,
    nested deeper than 32 levels, uses anchors or aliases (refused before anything is expanded, so an alias bomb
    costs nothing), repeats a key, or does not hold a mapping."""
    where = f"--config {path}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: {size} bytes; a configuration file must be <= {MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
        depth = 0
        for event in yaml.parse(_named(text, path), Loader=_ConfigLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                mark = event.start_mark
                raise ValueError(
                    f"{where}: line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                    "allowed in a configuration file"
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise ValueError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.load(_named(text, path), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must hold a mapping of configuration keys, got a {type(data).__name__}")
    return data
