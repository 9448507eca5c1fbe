"""Putting MoLE into existing models, and saving/loading just the MoLE weights (safetensors + JSON + a SHA-256
manifest, no pickle)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fedamole.adapter_state import MASK_KIND, MOLE_KINDS, state_key
from fedamole.atomic_io import atomic_write, sweep_stale_temp_files
from fedamole.config import MoLEConfig
from fedamole.layers import MoLEExperts, MoLELinear, base_features
from fedamole.manifest import load_json_strict, read_manifest, read_verified_bytes, write_manifest
from fedamole.targets import resolve_targets

WEIGHTS_FILE = "mole.safetensors"
CONFIG_FILE = "mole_config.json"
FORMAT_NAME = "fedamole-mole"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: with manifest.json
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_BOOL_DTYPES = ("BOOL",)


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
    modules (a list of full names or last components, e.g. ["classifier"]) that stay trainable and travel with
    `mole_state_dict` (a classification head). All-or-nothing: on any error the model is left as it was (modules
    and requires_grad flags). Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, MoLEConfig):
        raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
    if isinstance(extra_trainable, (str, bytes)) or not all(isinstance(n, str) for n in extra_trainable):
        raise TypeError(f"extra_trainable must be a list of module names, got {extra_trainable!r}")
    if mole_modules(model):
        raise ValueError("model already contains MoLELinear modules; inject_mole must be called once per model")
    targets, matched = _resolve_targets(model, config)
    resolved = dataclasses.replace(config, target_modules=targets)
    flags = _requires_grad_flags(model)
    try:
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
    except BaseException:
        _undo_injection(model, flags)
        raise
    model.fedamole_config = resolved
    model.fedamole_extra_trainable = sorted(set(extra_names))
    return model


def _requires_grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(param, param.requires_grad) for param in model.parameters()]


def _undo_injection(model: nn.Module, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Put back the base modules of every MoLELinear and the requires_grad flags recorded before injecting."""
    _uninject(model)
    for param, flag in flags:
        param.requires_grad_(flag)


def mole_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The MoLE weights (A, B, router, shared expert), the active-expert masks and the extra trainable modules'
    parameters, keyed by their names in `model.state_dict()`. Tensors are detached references (no copy)."""
    modules = mole_modules(model)
    if not modules:
        raise ValueError("model has no MoLELinear modules: call fedamole.inject_mole(model, config) first")
    state: dict[str, Tensor] = {}
    for name, module in modules.items():
        for kind in (*MOLE_KINDS, MASK_KIND):
            value = getattr(module, kind)
            if value is not None:
                state[state_key(name, kind)] = value.detach()
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
    """Save the MoLE weights to folder `path`: `mole.safetensors`, `mole_config.json` and `manifest.json` (the
    SHA-256 of both and of itself, `fedamole.manifest`). Stale temporary files of earlier, killed saves in the folder
    are removed first. Returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_files(folder)
    tensors = {k: v.contiguous().cpu().clone() for k, v in mole_state_dict(model).items()}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.fedamole_config.to_dict(),
        "modules": sorted(mole_modules(model)),
        "extra_trainable": list(getattr(model, "fedamole_extra_trainable", [])),
    }
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, allow_nan=False)))
    write_manifest(folder / MANIFEST_FILE, FORMAT_NAME, (CONFIG_FILE, WEIGHTS_FILE))
    return folder


@dataclass(frozen=True)
class _AdapterMeta:
    """The validated content of `mole_config.json`."""

    config: MoLEConfig
    modules: list[str]
    extra_trainable: list[str]


def _names(value, field: str, where: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
        raise ValueError(f"{where}: {field} must be a list of module names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: {field} lists a module twice")
    return list(value)


def _parse_meta(meta, where: Path) -> _AdapterMeta:
    """Strict schema check of `mole_config.json`: exactly the fields `save_mole` writes, each of its type."""
    fields = {"format", "version", "config", "modules", "extra_trainable"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a fedamole MoLE config (format != {FORMAT_NAME!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format version {meta.get('version')!r}, this fedamole reads {FORMAT_VERSION}")
    if set(meta) != fields:
        raise ValueError(
            f"{where}: unexpected fields {sorted(set(meta) - fields)} / missing fields {sorted(fields - set(meta))}"
        )
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: config must be a mapping of MoLEConfig fields, got {meta['config']!r}")
    missing = sorted({f.name for f in dataclasses.fields(MoLEConfig)} - set(meta["config"]))
    if missing:
        raise ValueError(f"{where}: config lacks the MoLEConfig fields {missing}")
    try:
        config = MoLEConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: config: {exc}") from exc
    modules = _names(meta["modules"], "modules", where)
    if not modules:
        raise ValueError(f"{where}: modules must name at least one module")
    return _AdapterMeta(config, modules, _names(meta["extra_trainable"], "extra_trainable", where))


def _expected_tensors(model: nn.Module, meta: _AdapterMeta, where: Path) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(shape, is_bool) of every tensor the adapter must hold for `model`, computed without allocating: from the
    injected modules, or from the saved config on the "meta" device."""
    if mole_modules(model):
        current, saved = model.fedamole_config.to_dict(), meta.config.to_dict()
        differing = sorted(k for k in saved if k != "backend" and saved[k] != current.get(k))
        if differing:
            raise ValueError(
                f"saved MoLE config differs from the model's in {differing}: saved "
                f"{ {k: saved[k] for k in differing} }, model { {k: current[k] for k in differing} }"
            )
        for field, have in (
            ("modules", sorted(mole_modules(model))),
            ("extra_trainable", model.fedamole_extra_trainable),
        ):
            if sorted(getattr(meta, field)) != sorted(have):
                raise ValueError(f"{where}: {field} {getattr(meta, field)} differs from the model's {have}")
        return {k: (tuple(v.shape), v.dtype == torch.bool) for k, v in mole_state_dict(model).items()}
    targets, matched = _resolve_targets(model, meta.config)
    if sorted(matched) != sorted(meta.modules):
        raise ValueError(
            f"{where}: modules {meta.modules} differ from the modules config.target_modules selects in this model "
            f"{sorted(matched)}"
        )
    resolved = dataclasses.replace(meta.config, target_modules=targets)
    expected = {}
    for name in matched:
        in_features, out_features = base_features(model.get_submodule(name))
        shapes = MoLEExperts(in_features, out_features, resolved, device="meta")
        for key, value in [*shapes.named_parameters(), *shapes.named_buffers()]:
            expected[f"{name}.{key}"] = (tuple(value.shape), value.dtype == torch.bool)
    inside = tuple(f"{name}." for name in matched)
    for name in meta.extra_trainable:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: extra_trainable entry {name!r} is not a module of the model") from None
        if name in matched or name.startswith(inside):
            raise ValueError(f"{where}: extra_trainable entry {name!r} is a MoLE module or inside one")
        for key, value in module.named_parameters():
            expected[f"{name}.{key}"] = (tuple(value.shape), False)
    return expected


def _check_header(path: Path, expected: dict[str, tuple[tuple[int, ...], bool]]) -> None:
    """Keys, shapes and dtypes of the safetensors file against `expected`, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {
                k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is corrupted or truncated: {exc}") from exc
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")
    for key, (shape, is_bool) in expected.items():
        got_shape, dtype = header[key]
        if got_shape != shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {list(got_shape)}, the config implies {list(shape)}")
        if dtype not in (_BOOL_DTYPES if is_bool else _FLOAT_DTYPES):
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, expected {'bool' if is_bool else 'a float'}")


def load_mole(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load what `save_mole` wrote into `model`; injects MoLE first (with the saved config) if the model has none.

    Order: the manifest and the SHA-256 of every file are verified, the config JSON is schema-checked, the tensors'
    shapes and dtypes are checked against the config and the model from the safetensors header, and only then are
    tensors read and MoLE injected. All-or-nothing: on any error the model is exactly as before (modules,
    requires_grad flags, weights). Raises FileNotFoundError for a missing file (including the manifest, which adapters
    of format version 1 lack) and ValueError, naming the file and field, for a corrupted, tampered,
    malformed or mismatching one.
    """
    folder = Path(path)
    if not (folder / MANIFEST_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / MANIFEST_FILE} not found (expected a folder written by fedamole.save_mole; folders of format "
            "version 1 have no manifest and cannot be verified: save them again)"
        )
    manifest = read_manifest(folder / MANIFEST_FILE, FORMAT_NAME, {CONFIG_FILE, WEIGHTS_FILE})
    meta = _parse_meta(
        load_json_strict(read_verified_bytes(folder, CONFIG_FILE, manifest), str(folder / CONFIG_FILE)),
        folder / CONFIG_FILE,
    )
    _check_header(folder / WEIGHTS_FILE, _expected_tensors(model, meta, folder / CONFIG_FILE))
    try:
        tensors = safetensors.torch.load(read_verified_bytes(folder, WEIGHTS_FILE, manifest))
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{folder / WEIGHTS_FILE} is corrupted or truncated: {exc}") from exc
    if mole_modules(model):
        load_mole_state_dict(model, tensors)  # all-or-nothing itself
        return model
    flags = _requires_grad_flags(model)
    inject_mole(model, meta.config, extra_trainable=meta.extra_trainable)
    try:
        load_mole_state_dict(model, tensors)
    except BaseException:
        _undo_injection(model, flags)
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
