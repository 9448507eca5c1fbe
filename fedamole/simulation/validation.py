"""Server-side checks of client uploads, and the fault injection used to test them.

`check_upload(upload, task, max_norm)` lists everything wrong with one client's upload (a `ClientResult`) against the
`ClientTask` the server sent it, field by field (as `fedamole.fl.client.finish_client` fills them):

* ``up`` / ``private``: exactly the requested keys (``task.upload`` / ``task.keep``); every tensor a
  dense CPU float tensor of the dtype and shape the server sent (or the client keeps), finite, with an L2 norm within
  `max_norm` (an absolute ceiling; see `check_round` for the bound relative to the round);
* ``expert_ids``: exactly the experts the client was assigned, as integer ids (no duplicates, no foreign experts);
* ``stats``: None unless the task asks for statistics; then ``EmbeddingStats(t={module: [n]}, e={module: [k, r]})`` over
  exactly the modules sent, finite, with n = r (embedding router) or d_in (linear router, and then ``e`` is empty);
* ``metric``: None when the task does not ask for an evaluation; else a real number (a bool is not one) in
  [0, 1] (accuracy and ROUGE-L F are fractions) or NaN for a client without test examples;
* ``train_loss``: a finite real number, or NaN when the client ran no local step; ``num_train``: an int >= 0.

An upload with any problem is rejected whole: the server then behaves exactly as if that client had dropped out, so
a client can neither change another client's experts nor crash the round. `check_upload` itself never raises: an
upload it cannot even inspect is rejected with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections import Counter

import numpy as np
import torch
from torch import Tensor

from fedamole.adapter_state import split_key, state_key
from fedamole.fl.protocol import OK, RESULT_FIELDS, TRAINING_FAULTS, ClientResult, ClientTask, EmbeddingStats

__all__ = [
    "check_upload",
    "check_metric",
    "check_round",
    "FAULT_KINDS",
    "TRAINING_FAULTS",
    "UPLOAD_FAULTS",
    "UPLOAD_NORM_FLOOR",
    "corrupt_upload",
    "validate_faults",
]

UPLOAD_FAULTS = (
    "nan",
    "shape",
    "dtype",
    "huge_norm",
    "scaled",
    "missing_key",
    "extra_key",
    "foreign_expert",
    "duplicate_ids",
    "bad_stats",
    "bad_metric",
    "bad_loss",
)
FAULT_KINDS = TRAINING_FAULTS + UPLOAD_FAULTS

# `check_round`: changes with an RMS per element below this are never rejected (float32 round-off of O(1) weights
# is ~1e-7), so that a round whose updates are all tiny does not turn honest noise into outliers.
UPLOAD_NORM_FLOOR = 1e-6


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_tensor(name: str, value, template: Tensor | None, max_norm: float | None) -> list[str]:
    if not isinstance(value, Tensor):
        return [f"{name} is a {type(value).__name__}, not a tensor"]
    if value.layout != torch.strided or value.device.type != "cpu":
        return [f"{name} is a {value.layout} tensor on {value.device}, expected a dense CPU tensor"]
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


def _check_state(field: str, state, expected, templates: dict, max_norm: float | None) -> list[str]:
    if not isinstance(state, dict):
        return [f"{field} is a {type(state).__name__}, not a dict of tensors"]
    expected = set(expected)
    problems = [f"missing {field} tensor {k!r}" for k in sorted(expected - set(state), key=str)]
    problems += [f"unexpected {field} tensor {k!r}" for k in sorted(set(state) - expected, key=str)]
    for key in sorted(set(state) & expected):
        problems += _check_tensor(f"{field}[{key}]", state[key], templates.get(key), max_norm)
    return problems


def _int_ids(name: str, ids) -> tuple[list[int] | None, str | None]:
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        return None, f"expert_ids for {name} is not an array of ints: {exc}"
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        return None, f"expert_ids for {name} must be a 1-D array of ints, got {arr.dtype} of shape {list(arr.shape)}"
    return arr.astype(np.int64).tolist(), None


def _check_ids(claimed, assigned) -> list[str]:
    if assigned is None:
        return [] if not claimed else ["claims expert ids but none were assigned"]
    if not isinstance(claimed, dict):
        return ["expert_ids missing from the upload"]
    problems = [f"expert_ids for unknown module {m!r}" for m in sorted(set(claimed) - set(assigned), key=str)]
    for module, ids in assigned.items():
        if module not in claimed:
            problems.append(f"expert_ids for {module} missing")
            continue
        got, problem = _int_ids(module, claimed[module])
        if problem:
            problems.append(problem)
        elif len(set(got)) != len(got):
            problems.append(f"expert_ids for {module} has duplicates: {got}")
        elif sorted(got) != sorted(np.asarray(ids).reshape(-1).tolist()):
            foreign = sorted(set(got) - set(np.asarray(ids).tolist()))
            problems.append(f"expert_ids for {module} claims experts {foreign or got} it was not assigned")
    return problems


def _stat_shapes(payload: ClientTask) -> dict[str, tuple[tuple, tuple | None]]:
    """Per module sent, the expected (shape of t, shape of e or None) of its embedding statistics."""
    down = payload.state
    linear = payload.router == "linear"
    out = {}
    for module, ids in (payload.expert_ids or {}).items():
        k, r, d_in = down[state_key(module, "lora_a")].shape
        out[module] = ((d_in,), None) if linear else ((r,), (len(ids), r))
    return out


def _check_stats(stats, payload: ClientTask, max_norm: float | None) -> list[str]:
    if not payload.stats:
        return [] if stats is None else ["stats uploaded but not asked for"]
    if not isinstance(stats, EmbeddingStats) or not (isinstance(stats.t, dict) and isinstance(stats.e, dict)):
        return ["stats missing or malformed (expected EmbeddingStats(t={module: tensor}, e={module: tensor}))"]
    shapes = _stat_shapes(payload)
    problems = []
    for part, index in (("t", 0), ("e", 1)):
        got = getattr(stats, part)
        want = {m: s[index] for m, s in shapes.items() if s[index] is not None}
        problems += [f"stats.{part} for {m} missing" for m in sorted(set(want) - set(got))]
        problems += [f"stats.{part} for unexpected module {m!r}" for m in sorted(set(got) - set(want), key=str)]
        for module in sorted(set(want) & set(got)):
            value, name = got[module], f"stats.{part}[{module}]"
            problems += _check_tensor(name, value, None, max_norm)
            if isinstance(value, Tensor) and tuple(value.shape) != want[module]:
                problems.append(f"{name} has shape {list(value.shape)}, expected {list(want[module])}")
    return problems


def check_metric(metric) -> str | None:
    """What is wrong with a client's score (None: fine): a real number in [0, 1] (accuracy and ROUGE-L F are
    fractions; a bool is not a number), or NaN for a client without test examples."""
    if not _is_real(metric):
        return f"metric is a {type(metric).__name__}, not a number"
    if not (math.isnan(metric) or 0.0 <= metric <= 1.0):
        return f"metric {metric!r} is outside [0, 1]"
    return None


def _check_scalars(upload: ClientResult, payload: ClientTask) -> list[str]:
    problems = []
    metric = upload.metric
    if not payload.evaluate:
        if metric is not None:
            problems.append(f"metric {metric!r} uploaded but no evaluation was asked for")
    elif problem := check_metric(metric):
        problems.append(problem)
    loss = upload.train_loss
    if not _is_real(loss):
        problems.append(f"train_loss is a {type(loss).__name__}, not a number")
    elif math.isinf(loss):
        problems.append(f"train_loss {loss!r} is not finite (NaN is allowed: no local step)")
    num = upload.num_train
    if not isinstance(num, numbers.Integral) or isinstance(num, (bool, np.bool_)) or num < 0:
        problems.append(f"num_train must be an int >= 0, got {num!r}")
    fusion = upload.fusion_weights  # FDLoRA's AdaFusion weights (reported, not aggregated); None elsewhere
    if fusion is not None and not (
        isinstance(fusion, (list, tuple))
        and all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in fusion)
    ):
        problems.append(f"fusion_weights must be None or a list of finite numbers, got {fusion!r}")
    return problems


def _problems(upload, payload: ClientTask, max_norm: float | None) -> list[str]:
    if not isinstance(upload, ClientResult):
        return [f"upload is a {type(upload).__name__}, not a ClientResult"]
    # A result unpickled from a remote client can lack fields or carry others (its __dict__ is whatever was sent).
    present = set(vars(upload))
    problems = [f"upload has no {k!r}" for k in RESULT_FIELDS if k not in present]
    problems += [f"upload has an unexpected field {k!r}" for k in sorted(present - set(RESULT_FIELDS), key=str)]
    if problems:
        return problems
    if upload.status != OK:
        return [f"upload has status {upload.status!r}, not {OK!r}"]
    templates = payload.state
    problems += _check_state("up", upload.up, payload.upload, templates, max_norm)
    problems += _check_state("private", upload.private, payload.keep, templates, max_norm)
    problems += _check_ids(upload.expert_ids, payload.expert_ids)
    problems += _check_stats(upload.stats, payload, max_norm)
    problems += _check_scalars(upload, payload)
    return problems


def check_upload(upload, payload: ClientTask, max_norm: float | None = None) -> list[str]:
    """Problems with one client's `upload` given the `payload` it was sent (empty list: accept); never raises."""
    try:
        return _problems(upload, payload, max_norm)
    except Exception as exc:  # noqa: BLE001 - whatever a client sends, the server must survive looking at it
        return [f"upload could not be checked: {type(exc).__name__}: {exc}"]


def _rms(t: Tensor) -> float:
    return float(t.float().norm()) / math.sqrt(max(t.numel(), 1))


def check_round(
    uploads: list[ClientResult | None], payloads: list[ClientTask], norm_ratio: float | None
) -> dict[int, list[str]]:
    """Problems of uploads that each passed `check_upload`, judged against the round's other uploads.

    * A tensor the server sent no template for must have the (shape, dtype) most uploads agree on.
    * With `norm_ratio`: per uploaded key, a client's change (upload minus what it was sent or kept; the upload
      itself without one) measured as RMS per element, so that clients holding different numbers of experts
      compare, must be at most ``norm_ratio x max(m, UPLOAD_NORM_FLOOR)``, m the lower median of the round's
      non-zero changes. The lower median stays an honest client's value while fewer than half the clients inflate
      their updates (for two clients: the smaller one); a key with a single non-zero change is not judged.
      Local training uses Adam, whose steps are about lr per element whatever the gradient scale, so honest
      changes agree within a small factor.
    Returns {client: problems} for the clients to reject.
    """
    problems: dict[int, list[str]] = {}
    live = [c for c, u in enumerate(uploads) if u is not None]
    changes: dict[str, dict[int, float]] = {}
    for c in live:
        templates = payloads[c].state
        for key, value in uploads[c].up.items():
            base = templates.get(key)
            changes.setdefault(key, {})[c] = _rms(value if base is None else value.float() - base.float())
    for key in changes:
        untemplated = [c for c in changes[key] if key not in payloads[c].private and key not in payloads[c].down]
        if untemplated:
            kinds = Counter((tuple(uploads[c].up[key].shape), uploads[c].up[key].dtype) for c in untemplated)
            (shape, dtype), _ = kinds.most_common(1)[0]
            for c in untemplated:
                value = uploads[c].up[key]
                if (tuple(value.shape), value.dtype) != (shape, dtype):
                    problems.setdefault(c, []).append(
                        f"up[{key}] is {value.dtype} {list(value.shape)}, the round's uploads are {dtype} {list(shape)}"
                    )
    if norm_ratio is None:
        return problems
    for key, per_client in changes.items():
        nonzero = sorted(v for v in per_client.values() if v > 0)
        if len(nonzero) < 2:
            continue
        bound = norm_ratio * max(nonzero[(len(nonzero) - 1) // 2], UPLOAD_NORM_FLOOR)
        for c, change in per_client.items():
            if change > bound:
                problems.setdefault(c, []).append(
                    f"up[{key}] changes by {change:.3g} RMS per element > upload_norm_ratio {norm_ratio:g} x "
                    f"the round's lower median {bound / norm_ratio:.3g}"
                )
    return problems


def validate_faults(faults, num_clients: int, num_rounds: int) -> list[dict]:
    """Check the `faults` config: a list of {"round": r >= 1, "client": 0 <= c < C, "kind": one of FAULT_KINDS}, at
    most one per (round, client) (a second one would silently replace the first)."""
    if faults is None:
        return []
    if not isinstance(faults, (list, tuple)):
        raise ValueError(f"faults must be a list of {{round, client, kind}} entries, got {type(faults).__name__}")
    out, seen = [], {}
    for i, fault in enumerate(faults):
        if not isinstance(fault, dict) or set(fault) != {"round", "client", "kind"}:
            raise ValueError(f"faults[{i}] must be a mapping with exactly the keys round, client, kind; got {fault!r}")
        if fault["kind"] not in FAULT_KINDS:
            raise ValueError(f"faults[{i}].kind must be one of {', '.join(FAULT_KINDS)}; got {fault['kind']!r}")
        for key, hi in (("round", num_rounds), ("client", num_clients - 1)):
            lo = 1 if key == "round" else 0
            if isinstance(fault[key], bool) or not isinstance(fault[key], int) or not lo <= fault[key] <= hi:
                raise ValueError(f"faults[{i}].{key} must be an int in [{lo}, {hi}], got {fault[key]!r}")
        where = (fault["round"], fault["client"])
        if where in seen:
            raise ValueError(
                f"faults[{i}] repeats round {where[0]}, client {where[1]} (already faults[{seen[where]}]): "
                "one fault per client and round"
            )
        seen[where] = i
        out.append(dict(fault))
    return out


def corrupt_upload(upload: ClientResult, kind: str, payload: ClientTask) -> ClientResult:
    """A copy of `upload` damaged as a faulty or malicious client would send it (for tests and drills)."""
    bad = copy.deepcopy(upload)
    up = bad.up
    key = sorted(up)[0] if up else None
    if kind == "nan" and key:
        up[key] = up[key].clone().fill_(math.nan)
    elif kind == "shape" and key:
        up[key] = torch.cat([up[key], up[key]])
    elif kind == "dtype" and key:
        up[key] = up[key].double()
    elif kind == "huge_norm" and key:
        up[key] = up[key] * 0 + 1e12
    elif kind == "scaled":
        # A large but bounded scaling (under the default max_upload_norm): only the round-relative bound sees it.
        for k in [k for k in up if split_key(k)[1] == "lora_b"] or ([key] if key else []):
            up[k] = up[k] * 1e6
    elif kind == "missing_key" and key:
        del up[key]
    elif kind == "extra_key":
        up[state_key("__not_a_parameter__", "lora_a")] = torch.zeros(1)
    elif kind in ("foreign_expert", "duplicate_ids"):
        ids = {m: np.asarray(v).copy() for m, v in (payload.expert_ids or {"?": np.arange(1)}).items()}
        module = sorted(ids)[0]
        ids[module][-1] = ids[module][0] if kind == "duplicate_ids" else int(ids[module].max()) + 1_000
        bad = dataclasses.replace(bad, expert_ids=ids)
    elif kind == "bad_stats":
        bad = dataclasses.replace(bad, stats=EmbeddingStats(t={"x": torch.full((3,), math.inf)}, e={}))
    elif kind == "bad_metric":
        bad = dataclasses.replace(bad, metric=math.inf)
    elif kind == "bad_loss":
        bad = dataclasses.replace(bad, train_loss="low")
    return bad
