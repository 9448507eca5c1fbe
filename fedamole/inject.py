"""Putting MoLE into existing models, and saving/loading just the MoLE weights (safetensors + JSON, no pickle)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedamole.atomic_io import atomic_write
from fedamole.config import MoLEConfig
from fedamole.layers import MoLELinear
from fedamole.targets import resolve_targets

WEIGHTS_FILE = "mole.safetensors"
CONFIG_FILE = "mole_config.json"
FORMAT_NAME = "fedamole-mole"
FORMAT_VERSION = 1


def mole_modules(model: nn.Module) -> dict[str, MoLELinear]:
    """Every MoLELinear in `model`, by module name, in registration order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoLELinear)}


def _resolve_targets(model: nn.Module, config: MoLEConfig) -> tuple[str | tuple[str, ...], list[str]]:
    return resolve_targets(model, config.target_modules, config.exclude_modules)


def inject_mole(model: nn.Module, config: MoLEConfig, extra_trainable: Sequence[str] = ()) -> nn.Module:
    """Replace the target linear modules of `model` by MoLELinear (in place) and freeze everything else.

    The low-level call (`get_mole_model` is the PEFT-style entry point). Targets follow PEFT's rules
    (`fedamole.targets`): `config.target_modules` a list of names (exact or dotted suffix: "self_attn.q_proj"), a
    regex (full match), "all-linear" (every nn.Linear / GPT-2 Conv1D but the output head), or None for PEFT's
    defaults (q_proj,v_proj then query,value); `config.exclude_modules` removes matches. `extra_trainable` names
    modules (full name or last component, e.g. "classifier") that stay trainable and travel with
    `mole_state_dict` (a classification head). Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, MoLEConfig):
        raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
    if mole_modules(model):
        raise ValueError("model already contains MoLELinear modules; inject_mole must be called once per model")
    targets, matched = _resolve_targets(model, config)
    resolved = dataclasses.replace(config, target_modules=targets)
    model.requires_grad_(False)
    for name in matched:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        setattr(parent, leaf, MoLELinear(base, resolved).train(base.training))
    extra_names = []
    for wanted in extra_trainable:
        hits = [
            n
            for n, m in model.named_modules()
            if n and (n == wanted or n.rsplit(".", 1)[-1] == wanted) and not isinstance(m, MoLELinear)
        ]
        if not hits:
            raise ValueError(f"extra_trainable entry {wanted!r} matches no module of the model")
        for hit in hits:
            model.get_submodule(hit).requires_grad_(True)
            extra_names.append(hit)
    model.fedamole_config = resolved
    model.fedamole_extra_trainable = sorted(set(extra_names))
    return model


def mole_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The MoLE weights (A, B, router, shared expert), the active-expert masks and the extra trainable modules'
    parameters, keyed by their names in `model.state_dict()`. Tensors are detached references (no copy)."""
    modules = mole_modules(model)
    if not modules:
        raise ValueError("model has no MoLELinear modules: call fedamole.inject_mole(model, config) first")
    state: dict[str, Tensor] = {}
    for name, module in modules.items():
        for key in ("lora_a", "lora_b", "router", "shared_a", "shared_b", "active_experts"):
            value = getattr(module, key)
            if value is not None:
                state[f"{name}.{key}"] = value.detach()
    for name in getattr(model, "fedamole_extra_trainable", []):
        for key, value in model.get_submodule(name).named_parameters():
            state[f"{name}.{key}"] = value.detach()
    return state


def load_mole_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy `state_dict` (as produced by `mole_state_dict`) into `model`. All-or-nothing: every key, shape and
    dtype kind is checked before anything is written, so a bad state dict leaves the model untouched."""
    target = mole_state_dict(model)
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match the model's MoLE modules: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"state_dict[{key!r}] has shape {list(value.shape)}, the model expects {list(target[key].shape)}"
            )
        if (value.dtype == torch.bool) != (target[key].dtype == torch.bool):
            raise TypeError(f"state_dict[{key!r}] has dtype {value.dtype}, the model expects {target[key].dtype}")
        if value.dtype != torch.bool and not bool(torch.isfinite(value).all()):
            raise ValueError(f"state_dict[{key!r}] contains NaN or Inf")
    with torch.no_grad():
        for key, value in state_dict.items():
            target[key].copy_(value)


def save_mole(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the MoLE weights to folder `path`: `mole.safetensors` + `mole_config.json`. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu().clone() for k, v in mole_state_dict(model).items()}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.fedamole_config.to_dict(),
        "modules": sorted(mole_modules(model)),
        "extra_trainable": list(getattr(model, "fedamole_extra_trainable", [])),
    }
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def load_mole(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load what `save_mole` wrote into `model`; injects MoLE first (with the saved config) if the model has none.

    Raises FileNotFoundError for a missing file and ValueError for a corrupted, truncated or mismatching one;
    the model is modified only when everything checks out.
    """
    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found (expected a folder written by fedamole.save_mole)")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{folder / CONFIG_FILE} is not a fedamole MoLE config (format != {FORMAT_NAME!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} has format version {meta.get('version')}, this fedamole reads "
            f"version {FORMAT_VERSION}"
        )
    config = MoLEConfig.from_dict(meta["config"])
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{folder / WEIGHTS_FILE} is corrupted or truncated: {exc}") from exc
    if mole_modules(model):
        current = model.fedamole_config.to_dict()
        saved = config.to_dict()
        differing = sorted(k for k in saved if k != "backend" and saved[k] != current.get(k))
        if differing:
            raise ValueError(
                f"saved MoLE config differs from the model's in {differing}: saved "
                f"{ {k: saved[k] for k in differing} }, model { {k: current[k] for k in differing} }"
            )
        load_mole_state_dict(model, tensors)
        return model
    # Validate against a fresh injection before touching the caller's model: inject into it, and undo on error.
    inject_mole(model, config, extra_trainable=meta.get("extra_trainable", []))
    try:
        load_mole_state_dict(model, tensors)
    except (ValueError, TypeError):
        _uninject(model)
        raise
    return model


def _uninject(model: nn.Module) -> None:
    for name in mole_modules(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, getattr(parent, leaf).base)
    for attr in ("fedamole_config", "fedamole_extra_trainable"):
        if hasattr(model, attr):
            delattr(model, attr)
