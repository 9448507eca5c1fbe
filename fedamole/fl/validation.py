"""Server-side checks of client uploads, and the fault injection used to test them.

`check_upload(upload, payload, max_norm)` lists everything wrong with one client's upload against what the server
sent it: the uploaded keys must be exactly the requested ones; every tensor a float tensor of the dtype and shape
the server sent (or the client keeps), finite, with an L2 norm within `max_norm`; the expert ids the client claims
must be exactly the ones it was assigned (no duplicates, no foreign experts); embedding statistics must have the
assigned shapes and be finite. An upload with any problem is rejected whole: the server then behaves exactly as if
that client had dropped out, so a client can neither change another client's experts nor crash the round.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_upload", "FAULT_KINDS", "TRAINING_FAULTS", "UPLOAD_FAULTS", "corrupt_upload", "validate_faults"]

TRAINING_FAULTS = ("crash", "dropout", "diverge")
UPLOAD_FAULTS = ("nan", "shape", "dtype", "huge_norm", "missing_key", "extra_key", "foreign_expert",
                 "duplicate_ids", "bad_stats")
FAULT_KINDS = TRAINING_FAULTS + UPLOAD_FAULTS


def _check_tensor(name: str, value, template: Tensor | None, max_norm: float | None) -> list[str]:
    if not isinstance(value, Tensor):
        return [f"{name} is a {type(value).__name__}, not a tensor"]
    if not value.is_floating_point():
        return [f"{name} has dtype {value.dtype}, expected a float tensor"]
    problems = []
    if template is not None:
        if value.dtype != template.dtype:
            problems.append(f"{name} has dtype {value.dtype}, expected {template.dtype}")
        if tuple(value.shape) != tuple(template.shape):
            problems.append(f"{name} has shape {list(value.shape)}, expected {list(template.shape)}")
    if not bool(torch.isfinite(value).all()):
        problems.append(f"{name} contains NaN or Inf")
    elif max_norm is not None and float(value.float().norm()) > max_norm:
        problems.append(f"{name} has norm {float(value.float().norm()):.3g} > max_upload_norm {max_norm:.3g}")
    return problems


def _check_ids(claimed, assigned) -> list[str]:
    if assigned is None:
        return [] if not claimed else ["claims expert ids but none were assigned"]
    if not isinstance(claimed, dict):
        return ["expert_ids missing from the upload"]
    problems = [f"expert_ids for unknown module {m!r}" for m in sorted(set(claimed) - set(assigned))]
    for module, ids in assigned.items():
        if module not in claimed:
            problems.append(f"expert_ids for {module} missing")
            continue
        got = np.asarray(claimed[module]).reshape(-1)
        if len(set(got.tolist())) != got.size:
            problems.append(f"expert_ids for {module} has duplicates: {got.tolist()}")
        elif sorted(got.tolist()) != sorted(np.asarray(ids).reshape(-1).tolist()):
            foreign = sorted(set(got.tolist()) - set(np.asarray(ids).tolist()))
            problems.append(f"expert_ids for {module} claims experts {foreign or got.tolist()} it was not assigned")
    return problems


def _check_stats(stats, payload: dict, max_norm: float | None) -> list[str]:
    if not payload.get("stats"):
        return []
    if not isinstance(stats, dict) or not isinstance(stats.get("t"), dict) or not isinstance(stats.get("e"), dict):
        return ["stats missing or malformed (expected {'t': {...}, 'e': {...}})"]
    problems = []
    assigned = payload.get("expert_ids") or {}
    for module, value in stats["t"].items():
        problems += _check_tensor(f"stats.t[{module}]", value, None, max_norm)
        if isinstance(value, Tensor) and value.dim() != 1:
            problems.append(f"stats.t[{module}] must be 1-D, got shape {list(value.shape)}")
    for module, value in stats["e"].items():
        problems += _check_tensor(f"stats.e[{module}]", value, None, max_norm)
        if isinstance(value, Tensor) and module in assigned and (value.dim() != 2 or value.shape[0] !=
                                                                  len(assigned[module])):
            problems.append(f"stats.e[{module}] must have one row per assigned expert ({len(assigned[module])}), "
                            f"got shape {list(value.shape)}")
    if assigned and set(stats["t"]) != set(assigned):
        problems.append("stats.t does not cover exactly the modules the client was sent")
    return problems


def check_upload(upload, payload: dict, max_norm: float | None = None) -> list[str]:
    """Problems with one client's `upload` given the `payload` it was sent (empty list: accept)."""
    if not isinstance(upload, dict):
        return [f"upload is a {type(upload).__name__}, not a dict"]
    up = upload.get("up")
    if not isinstance(up, dict):
        return ["upload has no 'up' state"]
    expected = set(payload.get("upload", list(payload.get("down", {}))))
    problems = [f"missing uploaded tensor {k}" for k in sorted(expected - set(up))]
    problems += [f"unexpected uploaded tensor {k}" for k in sorted(set(up) - expected)]
    templates = {**payload.get("private", {}), **payload.get("down", {})}
    for key in sorted(set(up) & expected):
        problems += _check_tensor(key, up[key], templates.get(key), max_norm)
    problems += _check_ids(upload.get("expert_ids"), payload.get("expert_ids"))
    problems += _check_stats(upload.get("stats"), payload, max_norm)
    metric = upload.get("metric")
    if metric is not None and not isinstance(metric, (int, float)):
        problems.append(f"metric is a {type(metric).__name__}, not a number")
    return problems


def validate_faults(faults, num_clients: int, num_rounds: int) -> list[dict]:
    """Check the `faults` config: a list of {"round": r >= 1, "client": 0 <= c < C, "kind": one of FAULT_KINDS}."""
    if faults is None:
        return []
    if not isinstance(faults, (list, tuple)):
        raise ValueError(f"faults must be a list of {{round, client, kind}} entries, got {type(faults).__name__}")
    out = []
    for i, fault in enumerate(faults):
        if not isinstance(fault, dict) or set(fault) != {"round", "client", "kind"}:
            raise ValueError(f"faults[{i}] must be a mapping with exactly the keys round, client, kind; got {fault!r}")
        if fault["kind"] not in FAULT_KINDS:
            raise ValueError(f"faults[{i}].kind must be one of {', '.join(FAULT_KINDS)}; got {fault['kind']!r}")
        for key, hi in (("round", num_rounds), ("client", num_clients - 1)):
            lo = 1 if key == "round" else 0
            if isinstance(fault[key], bool) or not isinstance(fault[key], int) or not lo <= fault[key] <= hi:
                raise ValueError(f"faults[{i}].{key} must be an int in [{lo}, {hi}], got {fault[key]!r}")
        out.append(dict(fault))
    return out


def corrupt_upload(upload: dict, kind: str, payload: dict) -> dict:
    """A copy of `upload` damaged as a faulty or malicious client would send it (for tests and drills)."""
    bad = copy.deepcopy(upload)
    up = bad["up"]
    key = sorted(up)[0] if up else None
    if kind == "nan" and key:
        up[key] = up[key].clone().fill_(math.nan)
    elif kind == "shape" and key:
        up[key] = torch.cat([up[key], up[key]])
    elif kind == "dtype" and key:
        up[key] = up[key].double()
    elif kind == "huge_norm" and key:
        up[key] = up[key] * 0 + 1e12
    elif kind == "missing_key" and key:
        del up[key]
    elif kind == "extra_key":
        up["__not_a_parameter__.lora_a"] = torch.zeros(1)
    elif kind in ("foreign_expert", "duplicate_ids"):
        ids = {m: np.asarray(v).copy() for m, v in (payload.get("expert_ids") or {"?": np.arange(1)}).items()}
        module = sorted(ids)[0]
        ids[module][-1] = ids[module][0] if kind == "duplicate_ids" else int(ids[module].max()) + 1_000
        bad["expert_ids"] = ids
    elif kind == "bad_stats":
        bad["stats"] = {"t": {"x": torch.full((3,), math.inf)}, "e": {}}
    return bad
