"""Round checkpoints: everything a simulation needs to continue, in safetensors + JSON (no pickle), tamper-evident.

A checkpoint folder holds ``round-<r>.safetensors`` (every tensor and array of the state), ``round-<r>.json`` (the
rest of the state, as a tree) and ``checkpoint.json``: the manifest (`fedamole.manifest`) with the round and the
size and SHA-256 of both files and of itself. Writing is crash-safe: the two round files are written under
temporary names, fsynced and renamed; then the manifest the same way (the commit point); only then are older round
files removed. A process killed at any instant therefore leaves the previous complete checkpoint or the new one,
never a mix, plus perhaps temporary files, which are swept when a checkpoint is next loaded or saved.

Loading trusts nothing in the files: the manifest and every hash are verified first; file names are fixed by the
round (nothing outside the folder is ever opened, links are refused); the tree is decoded by an explicit schema
(tensors only by reference into the tensor file, NumPy arrays of a few plain dtypes, random generators only as
`np.random.PCG64` states; no name from the file is looked up in numpy or torch); every error is a ValueError naming
the file and the field. `check_resume_state` then checks the decoded state against a freshly set-up run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fedamole.atomic_io import atomic_write, sweep_stale_temp_files
from fedamole.manifest import load_json_strict, read_manifest, read_verified_bytes, write_manifest

__all__ = ["encode_tree", "decode_tree", "save_checkpoint", "load_checkpoint", "check_resume_state", "CHECKPOINT_JSON"]

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "fedamole-checkpoint"
VERSION = 3  # 2: state JSON covered by the manifest; 3: the algorithm's state is its `Algorithm.state_dict()`
MAX_DEPTH = 64
# NumPy dtypes an array in a checkpoint may have (what torch.from_numpy stores losslessly).
_NDARRAY_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_U128 = 1 << 128


def _round_files(round_idx: int) -> tuple[str, str]:
    return f"round-{round_idx}.json", f"round-{round_idx}.safetensors"


def encode_tree(obj, path: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able description of `obj`; its tensors/arrays are stored in `tensors` under their tree path.

    Non-finite floats become ``{"__float__": "nan" | "inf" | "-inf"}`` so that the JSON stays strict."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        if str(obj.dtype) not in _NDARRAY_DTYPES:
            raise TypeError(f"checkpoint: array at {path!r} has dtype {obj.dtype}, storable: {_NDARRAY_DTYPES}")
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.random.Generator):
        if not isinstance(obj.bit_generator, np.random.PCG64):
            raise TypeError(f"checkpoint: generator at {path!r} uses {type(obj.bit_generator).__name__}, not PCG64")
        return {"__np_generator__": "PCG64", "state": obj.bit_generator.state}
    if isinstance(obj, np.generic):
        return encode_tree(obj.item(), path, tensors)
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint: dict at {path!r} has non-string keys")
        return {"__dict__": {k: encode_tree(v, f"{path}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        items = [encode_tree(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path!r}")


def _node_error(where: str, message: str) -> ValueError:
    return ValueError(f"checkpoint: {where}: {message}")


def _decode_generator(node: dict, where: str) -> np.random.Generator:
    """A PCG64 generator from its state; the state's schema is checked field by field (the only bit generator
    accepted: no class is looked up by a name from the file)."""
    if set(node) != {"__np_generator__", "state"} or node["__np_generator__"] != "PCG64":
        raise _node_error(where, "a random generator must be {'__np_generator__': 'PCG64', 'state': ...}")
    state = node["state"]
    if not isinstance(state, dict) or set(state) != {"bit_generator", "state", "has_uint32", "uinteger"}:
        raise _node_error(where, "PCG64 state must hold bit_generator, state, has_uint32, uinteger")
    inner = state["state"]
    if state["bit_generator"] != "PCG64" or not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        raise _node_error(where, "PCG64 state.state must hold state and inc")
    for key, value, bound in (
        ("state.state", inner["state"], _U128),
        ("state.inc", inner["inc"], _U128),
        ("has_uint32", state["has_uint32"], 2),
        ("uinteger", state["uinteger"], 1 << 32),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
            raise _node_error(where, f"PCG64 {key} must be an int in [0, {bound}), got {value!r}")
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def decode_tree(node, tensors: dict[str, torch.Tensor], where: str = "state", used: set | None = None, depth: int = 0):
    """Inverse of `encode_tree`, by a strict schema: anything else raises ValueError naming the tree path.

    `used` (optional) collects the tensor keys referenced."""
    if depth > MAX_DEPTH:
        raise _node_error(where, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, list):
        return [decode_tree(v, tensors, f"{where}.{i}", used, depth + 1) for i, v in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) == 0:
        raise _node_error(where, f"unexpected value {node!r}")
    if "__tensor__" in node or "__ndarray__" in node:
        marker = "__tensor__" if "__tensor__" in node else "__ndarray__"
        wanted = {marker} if marker == "__tensor__" else {marker, "dtype"}
        key = node.get(marker)
        if set(node) != wanted or not isinstance(key, str):
            raise _node_error(where, f"a {marker} node must hold exactly {sorted(wanted)}")
        if key not in tensors:
            raise _node_error(where, f"refers to tensor {key!r}, which the tensor file does not hold")
        if used is not None:
            used.add(key)
        if marker == "__tensor__":
            return tensors[key]
        array = tensors[key].numpy()
        if node["dtype"] not in _NDARRAY_DTYPES or str(array.dtype) != node["dtype"]:
            raise _node_error(where, f"array dtype {node['dtype']!r} does not match the stored {array.dtype}")
        return array.copy()
    if "__np_generator__" in node:
        return _decode_generator(node, where)
    if "__float__" in node:
        if set(node) != {"__float__"} or node["__float__"] not in _NON_FINITE:
            raise _node_error(where, f"a __float__ node must be one of {sorted(_NON_FINITE)}")
        return _NON_FINITE[node["__float__"]]
    if set(node) == {"__tuple__"} and isinstance(node["__tuple__"], list):
        return tuple(decode_tree(v, tensors, f"{where}.{i}", used, depth + 1) for i, v in enumerate(node["__tuple__"]))
    if set(node) == {"__dict__"} and isinstance(node["__dict__"], dict):
        return {k: decode_tree(v, tensors, f"{where}.{k}", used, depth + 1) for k, v in node["__dict__"].items()}
    raise _node_error(where, f"unknown node with keys {sorted(node)[:8]}")


def save_checkpoint(folder: str | os.PathLike, round_idx: int, state: dict) -> Path:
    """Write `state` (a tree, see `encode_tree`) as the checkpoint of round `round_idx`; returns the manifest path.

    Stale temporary files of an earlier, killed write are removed first."""
    if isinstance(round_idx, bool) or not isinstance(round_idx, (int, np.integer)) or round_idx < 1:
        raise ValueError(f"round_idx must be an int >= 1, got {round_idx!r}")
    round_idx = int(round_idx)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, "state", tensors)
    state_name, tensors_name = _round_files(round_idx)
    body = {"format": FORMAT, "version": VERSION, "round": round_idx, "state": tree}
    atomic_write(folder / tensors_name, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / state_name, lambda tmp: Path(tmp).write_text(json.dumps(body, allow_nan=False)))
    write_manifest(folder / CHECKPOINT_JSON, FORMAT, (state_name, tensors_name), {"round": round_idx})
    for old in [*folder.glob("round-*.safetensors"), *folder.glob("round-*.json")]:
        if old.name not in (state_name, tensors_name):
            old.unlink(missing_ok=True)
    return folder / CHECKPOINT_JSON


def _manifest_round(fields: dict) -> set[str]:
    round_idx = fields.get("round")
    if set(fields) != {"round"} or isinstance(round_idx, bool) or not isinstance(round_idx, int) or round_idx < 1:
        raise ValueError(f"{CHECKPOINT_JSON}: round must be an int >= 1 and the only extra field, got {fields!r}")
    return set(_round_files(round_idx))


def load_checkpoint(folder: str | os.PathLike) -> tuple[int, dict] | None:
    """(round, state) of the last complete checkpoint in `folder`, or None if there is none yet.

    Stale temporary files of a killed write are removed first. Raises ValueError, naming the file and field, when
    the folder holds a checkpoint that is corrupted, tampered with or malformed (FileNotFoundError for a round
    file the manifest lists but that is missing)."""
    folder = Path(folder)
    sweep_stale_temp_files(folder)
    manifest_path = folder / CHECKPOINT_JSON
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return None
    try:
        manifest = read_manifest(manifest_path, FORMAT, _manifest_round)
    except FileNotFoundError as exc:
        raise ValueError(f"{manifest_path} lists a file that is missing: {exc}") from exc
    round_idx = manifest.fields["round"]
    state_name, tensors_name = _round_files(round_idx)
    body = load_json_strict(read_verified_bytes(folder, state_name, manifest), str(folder / state_name))
    if not isinstance(body, dict) or set(body) != {"format", "version", "round", "state"}:
        raise ValueError(f"{folder / state_name} must hold exactly format, version, round and state")
    if body["format"] == FORMAT and body["version"] != VERSION and isinstance(body["version"], int):
        raise ValueError(
            f"{folder / state_name}: checkpoint format version {body['version']}, this fedamole reads version "
            f"{VERSION} only: start the run afresh (without --resume) or resume it with the fedamole that wrote it"
        )
    if body["format"] != FORMAT or body["version"] != VERSION or body["round"] != round_idx:
        raise ValueError(
            f"{folder / state_name}: format/version/round do not match {CHECKPOINT_JSON} (round {round_idx})"
        )
    try:
        tensors = safetensors.torch.load(read_verified_bytes(folder, tensors_name, manifest))
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{folder / tensors_name} cannot be read: {exc}") from exc
    used: set[str] = set()
    try:
        state = decode_tree(body["state"], tensors, used=used)
    except ValueError as exc:
        raise ValueError(f"{folder / state_name}: {exc}") from exc
    if used != set(tensors):
        raise ValueError(
            f"{folder / tensors_name} holds tensors the state never refers to: {sorted(set(tensors) - used)[:8]}"
        )
    if not isinstance(state, dict):
        raise ValueError(f"{folder / state_name}: state must be a mapping")
    return round_idx, state


def _check_like(value, reference, where: str) -> None:
    """`value` (decoded from a checkpoint) has the structure of `reference` (the same state, freshly set up): the
    dict keys at least (a client's private map gains keys over the rounds), the same list lengths (unless the
    reference list is empty: a log that grows), tensor and array shapes and dtypes, scalar types; floating-point
    tensors and arrays are finite."""
    if isinstance(reference, torch.Tensor) or isinstance(reference, np.ndarray):
        kind = type(reference)
        if not isinstance(value, kind):
            raise _node_error(where, f"must be a {kind.__name__}, got {type(value).__name__}")
        if tuple(value.shape) != tuple(reference.shape) or value.dtype != reference.dtype:
            raise _node_error(
                where,
                f"has shape {list(value.shape)} {value.dtype}, expected {list(reference.shape)} {reference.dtype}",
            )
        _check_finite(value, where)
    elif isinstance(reference, dict):
        if not isinstance(value, dict):
            raise _node_error(where, f"must be a mapping, got {type(value).__name__}")
        missing = sorted(set(reference) - set(value))
        if missing:
            raise _node_error(where, f"lacks the keys {missing[:8]}")
        for key, item in value.items():
            if key in reference:
                _check_like(item, reference[key], f"{where}.{key}")
            else:  # a map that fills up over the rounds (a client's private state)
                _check_leaves_finite(item, f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        if type(value) is not type(reference):
            raise _node_error(where, f"must be a {type(reference).__name__}, got {type(value).__name__}")
        if reference and len(value) != len(reference):
            raise _node_error(where, f"has {len(value)} entries, expected {len(reference)}")
        for i, item in enumerate(value):
            if reference:
                _check_like(item, reference[i], f"{where}.{i}")
            else:
                _check_leaves_finite(item, f"{where}.{i}")
    elif isinstance(reference, np.random.Generator):
        if not isinstance(value, np.random.Generator):
            raise _node_error(where, f"must be a random generator, got {type(value).__name__}")
    elif reference is not None and type(value) is not type(reference):
        raise _node_error(where, f"must be a {type(reference).__name__}, got {value!r}")


def _check_finite(value, where: str) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise _node_error(where, "contains NaN or Inf")
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
        raise _node_error(where, "contains NaN or Inf")


def _check_leaves_finite(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_leaves_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_leaves_finite(item, f"{where}.{i}")
    else:
        _check_finite(value, where)


def check_resume_state(round_idx: int, state: dict, reference: dict) -> None:
    """Semantic checks of a loaded checkpoint before a run resumes from it; ValueError naming the field.

    `reference` is the state the run would save, freshly set up (keys config, algorithm, model, torch_rng,
    summary, history). The algorithm's state and the model's weights must have the reference's structure (see
    `_check_like`: shapes, dtypes, finite values); history must hold exactly rounds 1..round_idx in order; the
    summary only ``initial_*`` entries."""
    if set(state) != set(reference):
        raise _node_error("state", f"must hold the keys {sorted(reference)}, got {sorted(state)}")
    if not isinstance(state["config"], dict):
        raise _node_error("state.config", "must be a mapping")
    for key in ("algorithm", "model", "torch_rng"):
        _check_like(state[key], reference[key], f"state.{key}")
    summary = state["summary"]
    if not isinstance(summary, dict) or not all(k.startswith("initial_") for k in summary):
        raise _node_error("state.summary", "must be a mapping of initial_* entries")
    history = state["history"]
    if not isinstance(history, list) or len(history) != round_idx:
        got = len(history) if isinstance(history, list) else type(history).__name__
        raise _node_error("state.history", f"must list the {round_idx} rounds done, got {got}")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or entry.get("round") != i + 1:
            raise _node_error(f"state.history.{i}", f"must be the entry of round {i + 1}")
