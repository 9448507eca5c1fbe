"""Round checkpoints: everything a simulation needs to continue, in safetensors + JSON (no pickle).

A checkpoint folder holds ``round-<r>.safetensors`` (every tensor and array of the state) and ``checkpoint.json``
(the rest, with the tensors' file name and its SHA-256). Writing is crash-safe: the tensor file is written under a
temporary name, fsynced and renamed; then the JSON the same way; only then are older tensor files removed. A
process killed at any instant therefore leaves either the previous complete checkpoint or the new one, never a
mix, and `load_checkpoint` refuses a folder whose files do not match.

The algorithm's state is its instance attributes, encoded as a tree: tensors and numpy arrays go to the
safetensors file, NumPy random generators as their bit-generator state, plain values to JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedamole.atomic_io import atomic_write

__all__ = ["encode_tree", "decode_tree", "save_checkpoint", "load_checkpoint", "CHECKPOINT_JSON"]

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "fedamole-checkpoint"
VERSION = 1


def encode_tree(obj, path: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able description of `obj`; its tensors/arrays are stored in `tensors` under their tree path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.random.Generator):
        return {"__np_generator__": type(obj.bit_generator).__name__, "state": obj.bit_generator.state}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint: dict at {path!r} has non-string keys")
        return {"__dict__": {k: encode_tree(v, f"{path}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        items = [encode_tree(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path!r}")


def decode_tree(node, tensors: dict[str, torch.Tensor]):
    """Inverse of `encode_tree`."""
    if isinstance(node, list):
        return [decode_tree(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy().astype(node["dtype"], copy=True)
    if "__np_generator__" in node:
        bit_generator = getattr(np.random, node["__np_generator__"])()
        bit_generator.state = node["state"]
        return np.random.Generator(bit_generator)
    if "__tuple__" in node:
        return tuple(decode_tree(v, tensors) for v in node["__tuple__"])
    if "__dict__" in node:
        return {k: decode_tree(v, tensors) for k, v in node["__dict__"].items()}
    raise ValueError(f"checkpoint: unknown node {sorted(node)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: str | os.PathLike, round_idx: int, state: dict) -> Path:
    """Write `state` (a tree, see `encode_tree`) as the checkpoint of round `round_idx`; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, "state", tensors)
    weights = folder / f"round-{round_idx}.safetensors"
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "version": VERSION, "round": int(round_idx), "tensors": weights.name,
            "sha256": _sha256(weights), "state": tree}
    atomic_write(folder / CHECKPOINT_JSON, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    for old in folder.glob("round-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return folder / CHECKPOINT_JSON


def load_checkpoint(folder: str | os.PathLike) -> tuple[int, dict] | None:
    """(round, state) of the last complete checkpoint in `folder`, or None if there is none yet.

    Raises ValueError when the folder holds a checkpoint that is corrupted or tampered with."""
    folder = Path(folder)
    meta_path = folder / CHECKPOINT_JSON
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path} is not a fedamole checkpoint of version {VERSION}")
    weights = folder / str(meta.get("tensors", ""))
    if not weights.is_file():
        raise ValueError(f"{meta_path} refers to {weights.name}, which is missing")
    if _sha256(weights) != meta.get("sha256"):
        raise ValueError(f"{weights} does not match the SHA-256 recorded in {meta_path} (truncated or tampered)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights} cannot be read: {exc}") from exc
    return int(meta["round"]), decode_tree(meta["state"], tensors)
