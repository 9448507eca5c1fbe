"""PEFT LoRA interop: seed MoLE experts from a PEFT LoRA adapter folder, and export the shared experts as one.

MoLE's shared expert is exactly a PEFT LoRA: ``lora_A.weight`` [r, d_in] = ``shared_a``, ``lora_B.weight``
[d_out, r] = ``shared_b``, the product scaled by alpha / r. Only the standard saved format is read (an
``adapter_config.json`` plus ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A[.<adapter>].weight``), with json + safetensors alone: peft is needed only
to export.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedamole.atomic_io import atomic_write
from fedamole.inject import mole_modules
from fedamole.layers import MoLEExperts

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT options that change what the adapter computes; each is off when falsy (bias: when "none").
_UNSUPPORTED = (
    "use_dora fan_in_fan_out bias lora_bias use_qalora target_parameters alora_invocation_tokens layer_replication "
    "trainable_token_indices use_bdlora arrow_config kasa_config monteclora_config"
).split()
# init_lora_weights values whose adapters are relative to a modified base model (residual / quantised weights).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Heads that PeftModelFor<task> always saves next to the LoRA weights (PEFT's own lists).
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _adapted_experts(model: nn.Module) -> dict[str, MoLEExperts]:
    """The experts of every adapted layer, by the layer's name as PEFT LoRA keys it: `inject_mole`'s MoLELinear
    modules, and the active adapter's experts of `get_mole_model`'s layers (``base_model.model.`` removed)."""
    experts: dict[str, MoLEExperts] = dict(mole_modules(model))
    tuner = sys.modules.get("fedamole.peft_tuner")  # not imported yet: no model holds its layers (import: ~2 s)
    for name, module in model.named_modules():
        if tuner is not None and isinstance(module, tuner.MoLEPeftLayer):
            active = [a for a in module.active_adapters if a in module.mole_experts]
            if active:
                experts[name.removeprefix("base_model.model.")] = module.mole_experts[active[0]]
    return experts


def _some(names: list[str]) -> str:
    return f"{names[:8]}{f' ... ({len(names)} in all)' if len(names) > 8 else ''}"


def _read_adapter(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            hint = " (only safetensors adapters are read, not adapter_model.bin)" if name == WEIGHTS_FILE else ""
            raise FileNotFoundError(f"adapter_dir: {folder / name} not found{hint}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter_dir: {folder / CONFIG_FILE} is not valid JSON: {exc}") from exc
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"adapter_dir: {folder / WEIGHTS_FILE} is corrupted or truncated: {exc}") from exc
    return config, tensors


def _check_config(config, path: Path) -> float:
    """Validate a PEFT LoRA config; return its scaling (lora_alpha / r, or / sqrt(r) with use_rslora)."""
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} is not a PEFT LoRA config (peft_type {found!r}, expected 'LORA')")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path}: r must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    for option in _UNSUPPORTED:
        value = config.get(option)
        if value and not (option == "bias" and value == "none"):
            raise ValueError(
                f"{path}: unsupported PEFT option {option}={value!r} (MoLE experts are plain LoRA: only adapters "
                f"with {option} {'none' if option == 'bias' else 'off'} can be loaded)"
            )
    for option, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        differing = {k: v for k, v in (config.get(option) or {}).items() if v != default}
        if differing:
            raise ValueError(
                f"{path}: unsupported PEFT option {option} {differing} (per-module values that differ "
                f"from {'r' if option == 'rank_pattern' else 'lora_alpha'}={default})"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{path}: unsupported PEFT option init_lora_weights={init!r}: such an adapter is relative to "
            "a modified base model; convert it with PEFT's save_pretrained("
            "path_initial_model_for_weight_conversion=...) first"
        )
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def from_peft_lora(model: nn.Module, adapter_dir: str | os.PathLike, *, routed: bool = False) -> nn.Module:
    """Seed the shared expert of every MoLE module of `model` (already injected) from a PEFT LoRA adapter folder.

    With `routed=True` the same A/B are also copied into every routed expert slot (`lora_a[i]`, `lora_b[i]`);
    a model without shared expert (`MoLEConfig.shared_expert=False`) can only be seeded that way. PEFT module
    ``base_model.model.<name>`` feeds MoLE module ``<name>``; every MoLE module needs its A and B, and every LoRA
    module of the adapter needs a MoLE module. Weights that PEFT keeps in full (`modules_to_save`, e.g. a
    SEQ_CLS classifier head) are copied into the model's parameters of the same name, as PEFT would load them.

    Scaling: when PEFT's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) differs from MoLE's
    alpha / rank, B is multiplied by their ratio so every expert computes the same function as the PEFT LoRA.

    All-or-nothing: the files, the config, every key, shape and value are checked before anything is written.
    Raises FileNotFoundError for a missing file and ValueError for a rank mismatch, a missing or extra module,
    an unsupported PEFT option (DoRA, fan_in_fan_out, bias, differing rank/alpha patterns, ...) or a bad file.
    Returns `model`.
    """
    modules = _adapted_experts(model)
    if not modules:
        raise ValueError(
            "model has no MoLE modules: call fedamole.get_mole_model(model, config) or fedamole.inject_mole first"
        )
    if not routed and any(m.shared_a is None for m in modules.values()):
        raise ValueError(
            "model has no shared expert (MoLEConfig.shared_expert=False) to seed: inject with "
            "shared_expert=True, or pass routed=True to seed the routed experts only"
        )
    folder = Path(adapter_dir)
    config, tensors = _read_adapter(folder)
    peft_scaling = _check_config(config, folder / CONFIG_FILE)
    lora, full = _split_tensors(tensors, folder)
    # (destination, source) pairs, written only after every check passed.
    plan = _plan_lora(modules, lora, config["r"], peft_scaling, folder, routed) + _plan_full(
        model, modules, full, folder
    )
    with torch.no_grad():
        for destination, source in plan:
            destination.copy_(source)
    return model


def _split_tensors(tensors: dict[str, Tensor], folder: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """An adapter's tensors -> ({module: {"A": lora_A, "B": lora_B}}, {name: tensor PEFT keeps in full}), names
    without ``base_model.model.``; raises ValueError when the file mixes several adapters."""
    lora: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    adapters = set()
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            lora.setdefault(match["module"], {})[match["part"]] = value
            adapters.add(match["adapter"])
        else:
            full[name] = value
    if len(adapters) > 1:
        raise ValueError(
            f"adapter_dir: {folder / WEIGHTS_FILE} mixes adapters {sorted(map(str, adapters))}; "
            "save one adapter per folder"
        )
    return lora, full


def _plan_lora(
    modules: dict[str, MoLEExperts], lora: dict, rank: int, peft_scaling: float, folder: Path, routed: bool
) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) of every MoLE tensor the adapter's LoRA weights seed, after checking that the adapter
    and the model have the same modules, rank and shapes and that the weights are finite."""
    plan: list[tuple[Tensor, Tensor]] = []
    missing = [name for name in modules if set(lora.get(name, {})) != {"A", "B"}]
    if missing:
        raise ValueError(
            f"adapter_dir: {folder / WEIGHTS_FILE} lacks lora_A/lora_B weights for MoLE modules "
            f"{_some(missing)} (it has LoRA weights for {_some(sorted(lora))})"
        )
    extra = sorted(set(lora) - set(modules))
    if extra:
        raise ValueError(
            f"adapter_dir: {folder / WEIGHTS_FILE} has LoRA weights for modules {_some(extra)} that are not "
            "MoLE modules of the model; inject MoLE with target_modules covering them"
        )
    for name, module in modules.items():
        if module.config.rank != rank:
            raise ValueError(f"adapter r={rank} does not match MoLEConfig.rank={module.config.rank} of module {name!r}")
        a, b = lora[name]["A"], lora[name]["B"]
        for part, value, shape in (
            ("A", a, (module.config.rank, module.in_features)),
            ("B", b, (module.out_features, module.config.rank)),
        ):
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"adapter lora_{part} of {name!r} has shape {list(value.shape)}, the module expects {list(shape)}"
                )
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"adapter lora_{part} of {name!r} is not a finite floating-point tensor")
        ratio = peft_scaling / module.config.scaling
        b = b if ratio == 1.0 else (b.double() * ratio).to(b.dtype)
        if module.shared_a is not None:
            plan += [(module.shared_a, a), (module.shared_b, b)]
        if routed:
            plan += [(module.lora_a, a), (module.lora_b, b)]  # broadcast over the expert (and client) slots
    return plan


def _plan_full(
    model: nn.Module, modules: dict[str, MoLEExperts], full: dict[str, Tensor], folder: Path
) -> list[tuple[Tensor, Tensor]]:
    """(destination, source) of every tensor PEFT keeps in full (``modules_to_save``): the model's parameter of the
    same name outside the MoLE modules, checked for shape and finite values."""
    plan: list[tuple[Tensor, Tensor]] = []
    inside_mole = tuple(f"{name}." for name in modules)
    params = {k: v for k, v in model.named_parameters(remove_duplicate=False) if not k.startswith(inside_mole)}
    for key, value in full.items():
        names = (key, key.replace(".modules_to_save.default.", "."), key.replace(".modules_to_save.", "."))
        target = next((params[k] for k in names if k in params), None)
        if target is None:
            raise ValueError(
                f"adapter_dir: {folder / WEIGHTS_FILE} has tensor {PREFIX + key!r}, which is neither a "
                "plain LoRA weight nor a parameter of the model (unsupported PEFT feature)"
            )
        if tuple(value.shape) != tuple(target.shape) or not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"adapter tensor {PREFIX + key!r} has shape {list(value.shape)} or non-finite values; "
                f"the model's parameter has shape {list(target.shape)}"
            )
        plan.append((target, value))
    return plan


def _infer_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return "SEQ_2_SEQ_LM" if name.endswith("ForConditionalGeneration") and encoder_decoder is True else None


def to_peft_lora(model: nn.Module, adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Export the shared experts of `model` as a PEFT LoRA adapter folder; returns the folder.

    Writes ``adapter_config.json`` (a `peft.LoraConfig`: r = rank, lora_alpha = alpha, target_modules = the
    MoLE modules' leaf names, task_type from the model class: CAUSAL_LM, SEQ_CLS, ... or None) and
    ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` = shared_a, ``lora_B.weight`` =
    shared_b), each atomically, so that ``peft.PeftModel.from_pretrained(base_model, adapter_dir)`` loads it
    with no missing or unexpected keys. The model's `extra_trainable` modules (and the heads PEFT saves for the
    task type) go in as `modules_to_save`. Routed experts have no PEFT counterpart and are not exported: the
    PEFT model equals the MoLE model only while the routed experts contribute nothing (all lora_b zero).
    `base_model_name_or_path` defaults to the model's `name_or_path`. Needs peft (`pip install peft`).
    """
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ImportError("to_peft_lora needs the peft package: pip install peft") from exc
    modules = _adapted_experts(model)
    if not modules:
        raise ValueError(
            "model has no MoLE modules: call fedamole.get_mole_model(model, config) or fedamole.inject_mole first"
        )
    no_shared = sorted(name for name, module in modules.items() if module.shared_a is None)
    if no_shared:
        raise ValueError(
            f"MoLE modules {no_shared[:4]} have no shared expert (MoLEConfig.shared_expert=False): "
            "there is no LoRA to export"
        )
    configs = {(m.config.rank, float(m.config.alpha)) for m in modules.values()}
    if len(configs) > 1:
        raise ValueError(f"MoLE modules differ in (rank, alpha) {sorted(configs)}; a PEFT adapter has one of each")
    ((rank, alpha),) = configs
    alpha = int(alpha) if alpha.is_integer() else alpha
    if any(bool(module.lora_b.any()) for module in modules.values()):
        warnings.warn(
            "to_peft_lora exports the shared experts only: the routed experts (non-zero lora_b) have no "
            "PEFT counterpart, so the PEFT model will not reproduce this MoLE model",
            stacklevel=2,
        )
    task_type = _infer_task_type(model)
    wanted = list(getattr(model, "fedamole_extra_trainable", [])) + list(_TASK_HEADS.get(task_type, ()))
    inside_mole = tuple(f"{name}." for name in modules)
    saved: list[str] = []  # modules PEFT will wrap (its rule: the module name ends with an entry), outermost only
    for name, _ in model.named_modules():
        if (
            name
            and not name.startswith(inside_mole)
            and name not in modules
            and any(map(name.endswith, wanted))
            and not any(name.startswith(f"{outer}.") for outer in saved)
        ):
            saved.append(name)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in modules}),
        task_type=task_type,
        modules_to_save=sorted(set(wanted)) or None,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = module.shared_a
        tensors[f"{PREFIX}{name}.lora_B.weight"] = module.shared_b
    for name in saved:
        for key, value in model.get_submodule(name).named_parameters():
            tensors[f"{PREFIX}{name}.{key}"] = value
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    folder = Path(adapter_dir)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(
        folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    )
    return folder
